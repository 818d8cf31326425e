/*
 * ngx_http_sbx_ratelimit.c: sbx_rate_limit, sbx_rate_limit_fallback and
 * sbx_redis (DESIGN.md sections 4 and 6).
 *
 * The access handler evaluates every limit of a location in one atomic
 * step: with sbx_redis, one EVALSHA of the GCRA script below per request
 * (all limits in one round trip, over the worker's pipelined link of
 * ngx_http_sbx_redis.c); without it, or while Redis is unreachable, the
 * same arithmetic (ngx_http_sbx_gcra.c) in a shared memory zone on this
 * node.  The handler runs after the residency check's (module order in
 * `config') and before any helper work.
 *
 * A request waits for Redis at most `timeout=' (a timer per request); then
 * the fallback decides and a late reply is dropped.  A key that Redis has
 * denied is remembered in the shared memory zone until its retry-after
 * ("deny cache"), so requests on a limited key cost no Redis round trip.
 *
 * Limits: "rate=N r/u" with "burst=B" gives the emission interval
 * T = period / N and lets B requests pass back to back from an idle key
 * (default B = N).  Answers carry
 *     RateLimit-Policy: "name";q=B;w=ceil(B * T), ...
 *     RateLimit: "name";r=REMAINING;t=RESET, ...
 * (draft-ietf-httpapi-ratelimit-headers, structured fields), a 429 also
 * Retry-After.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>
#include <ngx_md5.h>

#include <openssl/evp.h>

#include "ngx_http_sbx_module.h"
#include "ngx_http_sbx_gcra.h"
#include "ngx_http_sbx_redis.h"


#define NGX_HTTP_SBX_RL_LOCAL        0
#define NGX_HTTP_SBX_RL_OPEN         1
#define NGX_HTTP_SBX_RL_CLOSED       2

#define NGX_HTTP_SBX_RL_ZONE_SIZE    (8 * 1024 * 1024)
#define NGX_HTTP_SBX_RL_KEY_MAX      255     /* longer values are hashed */
#define NGX_HTTP_SBX_RL_NAME_MAX     64

#define NGX_HTTP_SBX_RL_NEW          0
#define NGX_HTTP_SBX_RL_WAITING      1
#define NGX_HTTP_SBX_RL_DONE         2


typedef struct {
    ngx_http_complex_value_t      key;
    ngx_str_t                     name;
    ngx_uint_t                    count;          /* N per period */
    ngx_uint_t                    period;         /* seconds */
    ngx_uint_t                    burst;
    int64_t                       interval;       /* T, microseconds */
    int64_t                       dvt;            /* B * T */
    ngx_str_t                     argv;           /* "T\0dvt\0enforce" */
    size_t                        interval_len;
    size_t                        dvt_len;
    ngx_flag_t                    dry_run;
} ngx_http_sbx_rl_limit_t;


typedef struct {
    ngx_array_t                  *limits;         /* ngx_http_sbx_rl_limit_t */
    ngx_uint_t                    fallback;
    ngx_str_t                     policy;         /* RateLimit-Policy */
} ngx_http_sbx_rl_loc_conf_t;


typedef struct {
    ngx_rbtree_t                  rbtree;
    ngx_rbtree_node_t             sentinel;
    ngx_queue_t                   lru;
} ngx_http_sbx_rl_shctx_t;


typedef struct {
    ngx_http_sbx_rl_shctx_t      *sh;
    ngx_slab_pool_t              *shpool;
} ngx_http_sbx_rl_zone_t;


/* a key's state in the zone: local GCRA and deny cache */
typedef struct {
    ngx_str_node_t                sn;             /* first: rbtree node */
    ngx_queue_t                   queue;
    int64_t                       tat;            /* local GCRA */
    int64_t                       deny_until;     /* deny cache */
    int64_t                       deny_reset;
    u_char                        data[1];
} ngx_http_sbx_rl_node_t;


typedef struct {
    ngx_http_sbx_redis_conf_t    *redis;          /* NULL: no sbx_redis */
    ngx_shm_zone_t               *zone;
    ngx_str_t                     script;
    u_char                        sha[40];

    ngx_http_sbx_redis_link_t     link;           /* worker-local */
} ngx_http_sbx_rl_main_conf_t;


typedef struct {
    ngx_flag_t                    evaluated;      /* key not empty */
    ngx_flag_t                    allowed;
    int64_t                       remaining;
    int64_t                       reset;          /* microseconds */
    int64_t                       retry_after;
    ngx_str_t                     key;            /* name ":" value */
    ngx_str_t                     redis_key;      /* prefix name ":" value */
} ngx_http_sbx_rl_result_t;


typedef struct ngx_http_sbx_rl_ctx_s  ngx_http_sbx_rl_ctx_t;

/* outlives the request while Redis still owes the reply */
typedef struct {
    ngx_http_sbx_rl_ctx_t        *ctx;            /* NULL: abandoned */
    ngx_http_sbx_redis_link_t    *link;
} ngx_http_sbx_rl_cmd_t;


struct ngx_http_sbx_rl_ctx_s {
    ngx_http_request_t           *request;
    ngx_uint_t                    state;
    ngx_uint_t                    nlimits;
    ngx_uint_t                    nkeys;          /* evaluated */
    ngx_http_sbx_rl_result_t     *results;

    ngx_flag_t                    denied;
    ngx_flag_t                    unavailable;
    ngx_flag_t                    headers_sent;
    ngx_flag_t                    fallback;
    ngx_int_t                     remaining;      /* -1: none */

    ngx_http_sbx_rl_cmd_t        *cmd;
    ngx_event_t                   deadline;
    ngx_msec_t                    start;
    ngx_uint_t                    probe;
    ngx_flag_t                    reloaded;       /* EVAL after NOSCRIPT */
};


static ngx_int_t ngx_http_sbx_rl_handler(ngx_http_request_t *r);
static ngx_http_sbx_rl_ctx_t *ngx_http_sbx_rl_get_ctx(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_rl_start(ngx_http_request_t *r,
    ngx_http_sbx_rl_ctx_t *ctx, ngx_http_sbx_rl_loc_conf_t *rlcf,
    ngx_http_sbx_rl_main_conf_t *rmcf);
static ngx_int_t ngx_http_sbx_rl_finish(ngx_http_request_t *r,
    ngx_http_sbx_rl_ctx_t *ctx, ngx_http_sbx_rl_loc_conf_t *rlcf);
static ngx_int_t ngx_http_sbx_rl_headers(ngx_http_request_t *r,
    ngx_http_sbx_rl_ctx_t *ctx, ngx_http_sbx_rl_loc_conf_t *rlcf);

static ngx_int_t ngx_http_sbx_rl_redis_send(ngx_http_request_t *r,
    ngx_http_sbx_rl_ctx_t *ctx, ngx_http_sbx_rl_loc_conf_t *rlcf,
    ngx_http_sbx_rl_main_conf_t *rmcf, ngx_flag_t full);
static void ngx_http_sbx_rl_redis_reply(redisAsyncContext *ac, void *reply,
    void *data);
static ngx_int_t ngx_http_sbx_rl_redis_parse(ngx_http_sbx_rl_ctx_t *ctx,
    redisReply *rr);
static void ngx_http_sbx_rl_deadline_handler(ngx_event_t *ev);
static void ngx_http_sbx_rl_fallback(ngx_http_request_t *r,
    ngx_http_sbx_rl_ctx_t *ctx, ngx_http_sbx_rl_loc_conf_t *rlcf,
    ngx_http_sbx_rl_main_conf_t *rmcf);
static void ngx_http_sbx_rl_resume(ngx_http_sbx_rl_ctx_t *ctx);
static void ngx_http_sbx_rl_cleanup(void *data);

static int64_t ngx_http_sbx_rl_now(void);
static ngx_http_sbx_rl_node_t *ngx_http_sbx_rl_lookup(
    ngx_http_sbx_rl_zone_t *z, ngx_str_t *key, ngx_flag_t create,
    int64_t now);
static void ngx_http_sbx_rl_expire(ngx_http_sbx_rl_zone_t *z, int64_t now,
    ngx_uint_t force);
static void ngx_http_sbx_rl_local(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf);
static ngx_int_t ngx_http_sbx_rl_deny_cached(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf);
static void ngx_http_sbx_rl_deny_store(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf);
static ngx_int_t ngx_http_sbx_rl_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);

static ngx_int_t ngx_http_sbx_rl_remaining_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static char *ngx_http_sbx_rate_limit(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_sbx_rate_limit_fallback(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);
static char *ngx_http_sbx_redis(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_sbx_rl_add_zone(ngx_conf_t *cf,
    ngx_http_sbx_rl_main_conf_t *rmcf);

static ngx_int_t ngx_http_sbx_rl_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_sbx_rl_init(ngx_conf_t *cf);
static void *ngx_http_sbx_rl_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_rl_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_sbx_rl_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_rl_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_sbx_rl_init_process(ngx_cycle_t *cycle);
static void ngx_http_sbx_rl_exit_process(ngx_cycle_t *cycle);


/*
 * The GCRA of ngx_http_sbx_gcra.c for all limits of a request, atomic in
 * Redis.  KEYS: one per limit; ARGV: interval, dvt, enforce (1/0) per
 * limit, microseconds.  Nothing is stored unless every enforced limit
 * passes.  Returns {all_allowed, then per limit: allowed, remaining,
 * reset, retry_after}.  Redis's clock (TIME) is the one clock of every
 * gateway node.
 */
static const char  ngx_http_sbx_rl_script[] =
    "local t = redis.call('TIME')\n"
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
    "local out = {1}\n"
    "local tats = {}\n"
    "local olds = {}\n"
    "for i = 1, #KEYS do\n"
    "  local interval = tonumber(ARGV[3 * i - 2])\n"
    "  local dvt = tonumber(ARGV[3 * i - 1])\n"
    "  local tat = tonumber(redis.call('GET', KEYS[i])) or now\n"
    "  if tat < now then tat = now end\n"
    "  local new = tat + interval\n"
    "  local at = new - dvt\n"
    "  local j = 4 * i - 2\n"
    "  if now < at then\n"
    "    if ARGV[3 * i] == '1' then out[1] = 0 end\n"
    "    out[j] = 0; out[j + 1] = 0\n"
    "    out[j + 2] = tat - now; out[j + 3] = at - now\n"
    "  else\n"
    "    tats[i] = new\n"
    "    olds[i] = tat\n"
    "    out[j] = 1\n"
    "    out[j + 1] = math.floor((now + dvt - new) / interval)\n"
    "    out[j + 2] = new - now; out[j + 3] = 0\n"
    "  end\n"
    "end\n"
    "if out[1] == 1 then\n"
    "  for i, v in pairs(tats) do\n"
    "    redis.call('SET', KEYS[i], string.format('%d', v), 'PX',\n"
    "               math.ceil((v - now) / 1000) + 1)\n"
    "  end\n"
    "else\n"
    "  for i, v in pairs(olds) do\n"
    "    local j = 4 * i - 2\n"
    "    out[j + 1] = math.floor((now + tonumber(ARGV[3 * i - 1]) - v)\n"
    "                            / tonumber(ARGV[3 * i - 2]))\n"
    "    out[j + 2] = v - now\n"
    "  end\n"
    "end\n"
    "return out\n";


static ngx_command_t  ngx_http_sbx_rl_commands[] = {

    { ngx_string("sbx_rate_limit"),
      NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_sbx_rate_limit,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_rate_limit_fallback"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sbx_rate_limit_fallback,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_redis"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_sbx_redis,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_ratelimit_module_ctx = {
    ngx_http_sbx_rl_add_variables,         /* preconfiguration */
    ngx_http_sbx_rl_init,                  /* postconfiguration */

    ngx_http_sbx_rl_create_main_conf,      /* create main configuration */
    ngx_http_sbx_rl_init_main_conf,        /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sbx_rl_create_loc_conf,       /* create location configuration */
    ngx_http_sbx_rl_merge_loc_conf         /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_ratelimit_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_ratelimit_module_ctx,    /* module context */
    ngx_http_sbx_rl_commands,              /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_sbx_rl_init_process,          /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_sbx_rl_exit_process,          /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_str_t  ngx_http_sbx_rl_zone_name =
    ngx_string("sbx_ratelimit");


/* the access handler */

static ngx_int_t
ngx_http_sbx_rl_handler(ngx_http_request_t *r)
{
    ngx_int_t                     rc;
    ngx_pool_cleanup_t           *cln;
    ngx_http_sbx_rl_ctx_t        *ctx;
    ngx_http_sbx_rl_loc_conf_t   *rlcf;
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_ratelimit_module);

    if (rlcf->limits == NULL) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_sbx_rl_get_ctx(r);

    if (ctx) {
        if (ctx->state == NGX_HTTP_SBX_RL_WAITING) {
            return NGX_AGAIN;
        }

        return ngx_http_sbx_rl_finish(r, ctx, rlcf);
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_ratelimit_module);

    ctx = ngx_pcalloc(r->pool, sizeof(ngx_http_sbx_rl_ctx_t));
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->request = r;
    ctx->remaining = -1;
    ctx->nlimits = rlcf->limits->nelts;

    ctx->results = ngx_pcalloc(r->pool,
                           ctx->nlimits * sizeof(ngx_http_sbx_rl_result_t));
    if (ctx->results == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    cln->handler = ngx_http_sbx_rl_cleanup;
    cln->data = ctx;

    ngx_http_set_ctx(r, ctx, ngx_http_sbx_ratelimit_module);

    rc = ngx_http_sbx_rl_start(r, ctx, rlcf, rmcf);

    if (rc != NGX_OK) {
        return rc;
    }

    if (ctx->state == NGX_HTTP_SBX_RL_WAITING) {
        return NGX_AGAIN;
    }

    return ngx_http_sbx_rl_finish(r, ctx, rlcf);
}


/*
 * The context survives internal redirects (an index file, error_page,
 * try_files), which clear module contexts: a request is counted once,
 * whatever locations it passes through.  It is found again through the
 * request pool's cleanup, as ngx_http_realip_module does.
 */

static ngx_http_sbx_rl_ctx_t *
ngx_http_sbx_rl_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t     *cln;
    ngx_http_sbx_rl_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r, ngx_http_sbx_ratelimit_module);

    if (ctx || !r->internal) {
        return ctx;
    }

    for (cln = r->pool->cleanup; cln; cln = cln->next) {
        if (cln->handler == ngx_http_sbx_rl_cleanup) {
            ctx = cln->data;
            ngx_http_set_ctx(r, ctx, ngx_http_sbx_ratelimit_module);
            return ctx;
        }
    }

    return NULL;
}


/* evaluates the keys, then decides now or sends the command */

static ngx_int_t
ngx_http_sbx_rl_start(ngx_http_request_t *r, ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    u_char                     *p;
    size_t                      plen;
    ngx_str_t                   val;
    ngx_md5_t                   md5;
    ngx_uint_t                  i;
    u_char                      digest[16];
    ngx_http_sbx_rl_limit_t    *limit;
    ngx_http_sbx_rl_result_t   *res;

    limit = rlcf->limits->elts;
    plen = rmcf->redis ? rmcf->redis->prefix.len : 0;

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (ngx_http_complex_value(r, &limit[i].key, &val) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        if (val.len == 0) {
            continue;
        }

        if (val.len > NGX_HTTP_SBX_RL_KEY_MAX) {
            ngx_md5_init(&md5);
            ngx_md5_update(&md5, val.data, val.len);
            ngx_md5_final(digest, &md5);

            val.data = ngx_pnalloc(r->pool, 2 * 16 + 4);
            if (val.data == NULL) {
                return NGX_HTTP_INTERNAL_SERVER_ERROR;
            }

            p = ngx_cpymem(val.data, "md5:", 4);
            val.len = ngx_hex_dump(p, digest, 16) - val.data;
        }

        p = ngx_pnalloc(r->pool, plen + limit[i].name.len + 1 + val.len);
        if (p == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        res->redis_key.data = p;

        if (plen) {
            p = ngx_cpymem(p, rmcf->redis->prefix.data, plen);
        }

        res->key.data = p;
        p = ngx_cpymem(p, limit[i].name.data, limit[i].name.len);
        *p++ = ':';
        p = ngx_cpymem(p, val.data, val.len);

        res->key.len = p - res->key.data;
        res->redis_key.len = p - res->redis_key.data;
        res->evaluated = 1;
        res->allowed = 1;
        ctx->nkeys++;
    }

    ctx->state = NGX_HTTP_SBX_RL_DONE;

    if (ctx->nkeys == 0) {
        return NGX_OK;
    }

    if (rmcf->redis == NULL) {
        ngx_http_sbx_rl_local(ctx, rlcf, rmcf);
        return NGX_OK;
    }

    if (ngx_http_sbx_rl_deny_cached(ctx, rlcf, rmcf) == NGX_OK) {
        ngx_log_debug0(NGX_LOG_DEBUG_HTTP, r->connection->log, 0,
                       "sbx rate limit: deny cache hit");
        return NGX_OK;
    }

    if (ngx_http_sbx_redis_link_ready(&rmcf->link, &ctx->probe) != NGX_OK) {
        ngx_http_sbx_rl_fallback(r, ctx, rlcf, rmcf);
        return NGX_OK;
    }

    ctx->start = ngx_current_msec;

    if (ngx_http_sbx_rl_redis_send(r, ctx, rlcf, rmcf, 0) != NGX_OK) {
        ngx_http_sbx_redis_link_failure(&rmcf->link, ctx->probe,
                                        "EVALSHA", "could not be queued");
        ngx_http_sbx_rl_fallback(r, ctx, rlcf, rmcf);
        return NGX_OK;
    }

    ctx->deadline.handler = ngx_http_sbx_rl_deadline_handler;
    ctx->deadline.data = ctx;
    ctx->deadline.log = r->connection->log;

    ngx_add_timer(&ctx->deadline, rmcf->redis->timeout);

    ctx->state = NGX_HTTP_SBX_RL_WAITING;

    return NGX_OK;
}


/* the decision: headers, variables, context; 429 or 503 if so */

static ngx_int_t
ngx_http_sbx_rl_finish(ngx_http_request_t *r, ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf)
{
    int64_t                    retry, remaining;
    ngx_uint_t                 i, deny, dry;
    ngx_http_sbx_ctx_t        *sctx;
    ngx_http_sbx_rl_limit_t   *limit;
    ngx_http_sbx_rl_result_t  *res;

    sctx = ngx_http_sbx_get_ctx(r);
    if (sctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->headers_sent) {
        /* after an internal redirect: decided already, counted once */
        sctx->ratelimit_remaining = ctx->remaining;
        sctx->ratelimit_fallback = ctx->fallback;
        return NGX_DECLINED;
    }

    ctx->headers_sent = 1;

    if (ngx_http_sbx_rl_headers(r, ctx, rlcf) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (ctx->unavailable) {
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "sbx_rate_limit: Redis unavailable, fallback "
                      "\"closed\" refuses the request");

        ngx_http_finalize_request(r,
            ngx_http_sbx_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                    NGX_HTTP_SBX_RATELIMIT_UNAVAILABLE, 0));
        return NGX_DONE;
    }

    limit = rlcf->limits->elts;
    remaining = -1;
    retry = 0;
    dry = 0;
    deny = (ngx_uint_t) -1;

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated) {
            continue;
        }

        if (remaining < 0 || res->remaining < remaining) {
            remaining = res->remaining;
        }

        if (res->allowed) {
            continue;
        }

        if (limit[i].dry_run) {
            ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                          "sbx_rate_limit: dry run, would deny by limit "
                          "\"%V\"", &limit[i].name);
            dry = 1;
            continue;
        }

        if (deny == (ngx_uint_t) -1 || res->retry_after > retry) {
            deny = i;
            retry = res->retry_after;
        }
    }

    if (dry) {
        ngx_http_sbx_metrics_dry_run(NGX_HTTP_SBX_DRY_RUN_RATELIMIT);
    }

    sctx->ratelimit_remaining = remaining;
    ctx->remaining = remaining;

    if (deny == (ngx_uint_t) -1) {
        return NGX_DECLINED;
    }

    sctx->limit = limit[deny].name;

    ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                  "sbx_rate_limit: limited by \"%V\", retry after %L us",
                  &limit[deny].name, retry);

    ngx_http_finalize_request(r,
        ngx_http_sbx_send_error(r, NGX_HTTP_TOO_MANY_REQUESTS,
                                NGX_HTTP_SBX_RATE_LIMITED,
                                (time_t) ngx_http_sbx_gcra_seconds(retry)));
    return NGX_DONE;
}


static ngx_int_t
ngx_http_sbx_rl_add_policy(ngx_http_request_t *r,
    ngx_http_sbx_rl_loc_conf_t *rlcf)
{
    ngx_table_elt_t  *h;

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "RateLimit-Policy");
    h->value = rlcf->policy;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_rl_headers(ngx_http_request_t *r, ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf)
{
    u_char                    *p;
    size_t                     len;
    ngx_uint_t                 i;
    ngx_table_elt_t           *h;
    ngx_http_sbx_rl_limit_t   *limit;
    ngx_http_sbx_rl_result_t  *res;

    if (ngx_http_sbx_rl_add_policy(r, rlcf) != NGX_OK) {
        return NGX_ERROR;
    }

    if (ctx->unavailable) {
        return NGX_OK;
    }

    limit = rlcf->limits->elts;
    len = 0;

    for (i = 0; i < ctx->nlimits; i++) {
        if (ctx->results[i].evaluated) {
            len += sizeof("\"\";r=;t=, ") - 1 + limit[i].name.len
                   + 2 * NGX_INT64_LEN;
        }
    }

    if (len == 0) {
        /* every key empty, or nothing counted */
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, len);
    if (p == NULL) {
        return NGX_ERROR;
    }

    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "RateLimit");
    h->value.data = p;

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated) {
            continue;
        }

        if (p != h->value.data) {
            *p++ = ','; *p++ = ' ';
        }

        p = ngx_sprintf(p, "\"%V\";r=%L;t=%L", &limit[i].name,
                        res->remaining > 0 ? res->remaining : 0,
                        ngx_http_sbx_gcra_seconds(res->reset));
    }

    h->value.len = p - h->value.data;

    return NGX_OK;
}


/*
 * An answer decided before the limits were checked (451 residency_denied,
 * 410 connector_retired) still carries the location's RateLimit-Policy:
 * the quota applies to the route even if this request did not count.
 * RateLimit needs a count, which would cost a Redis call a denied request
 * must not cost: it is left out.
 */

ngx_int_t
ngx_http_sbx_rl_policy_header(ngx_http_request_t *r)
{
    ngx_http_sbx_rl_ctx_t       *ctx;
    ngx_http_sbx_rl_loc_conf_t  *rlcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_ratelimit_module);

    if (rlcf == NULL || rlcf->limits == NULL) {
        return NGX_OK;
    }

    ctx = ngx_http_sbx_rl_get_ctx(r);

    if (ctx && ctx->headers_sent) {
        return NGX_OK;
    }

    return ngx_http_sbx_rl_add_policy(r, rlcf);
}


/* Redis */

static ngx_int_t
ngx_http_sbx_rl_redis_send(ngx_http_request_t *r, ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf,
    ngx_flag_t full)
{
    u_char                    *p;
    size_t                    *argvlen;
    ngx_uint_t                 i, n, k;
    const char               **argv;
    ngx_http_sbx_rl_cmd_t     *cmd;
    ngx_http_sbx_rl_limit_t   *limit;
    ngx_http_sbx_rl_result_t  *res;

    n = 3 + ctx->nkeys * 4;

    argv = ngx_palloc(r->pool, n * sizeof(char *));
    argvlen = ngx_palloc(r->pool, n * sizeof(size_t));
    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);

    if (argv == NULL || argvlen == NULL || p == NULL) {
        return NGX_ERROR;
    }

    if (full) {
        argv[0] = "EVAL";
        argvlen[0] = 4;
        argv[1] = (const char *) rmcf->script.data;
        argvlen[1] = rmcf->script.len;

    } else {
        argv[0] = "EVALSHA";
        argvlen[0] = 7;
        argv[1] = (const char *) rmcf->sha;
        argvlen[1] = 40;
    }

    argv[2] = (const char *) p;
    argvlen[2] = ngx_sprintf(p, "%ui", ctx->nkeys) - p;

    limit = rlcf->limits->elts;
    k = 3;

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (res->evaluated) {
            argv[k] = (const char *) res->redis_key.data;
            argvlen[k++] = res->redis_key.len;
        }
    }

    for (i = 0; i < ctx->nlimits; i++) {
        if (!ctx->results[i].evaluated) {
            continue;
        }

        p = limit[i].argv.data;

        argv[k] = (const char *) p;
        argvlen[k++] = limit[i].interval_len;
        p += limit[i].interval_len + 1;

        argv[k] = (const char *) p;
        argvlen[k++] = limit[i].dvt_len;
        p += limit[i].dvt_len + 1;

        argv[k] = (const char *) p;
        argvlen[k++] = 1;
    }

    cmd = ctx->cmd;

    if (cmd == NULL) {
        cmd = ngx_alloc(sizeof(ngx_http_sbx_rl_cmd_t), r->connection->log);
        if (cmd == NULL) {
            return NGX_ERROR;
        }

        cmd->ctx = ctx;
        cmd->link = &rmcf->link;
    }

    if (ngx_http_sbx_redis_link_send(&rmcf->link,
                                     ngx_http_sbx_rl_redis_reply, cmd,
                                     (int) k, argv, argvlen)
        != NGX_OK)
    {
        if (ctx->cmd == NULL) {
            ngx_free(cmd);
        }

        ctx->cmd = NULL;
        return NGX_ERROR;
    }

    ctx->cmd = cmd;

    return NGX_OK;
}


static void
ngx_http_sbx_rl_redis_reply(redisAsyncContext *ac, void *reply, void *data)
{
    ngx_http_sbx_rl_cmd_t *cmd = data;

    redisReply                   *rr;
    ngx_http_request_t           *r;
    ngx_http_sbx_rl_ctx_t        *ctx;
    ngx_http_sbx_redis_link_t    *link;
    ngx_http_sbx_rl_loc_conf_t   *rlcf;
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    rr = reply;
    link = cmd->link;
    ctx = cmd->ctx;

    if (link->pending) {
        link->pending--;
    }

    if (ctx == NULL || link->exiting) {
        /* the request timed out or went away, or the worker exits */
        if (ctx) {
            ctx->cmd = NULL;
        }

        ngx_free(cmd);
        return;
    }

    r = ctx->request;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_ratelimit_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_ratelimit_module);

    if (rr && rr->type == REDIS_REPLY_ERROR && !ctx->reloaded
        && ngx_strncmp(rr->str, "NOSCRIPT", 8) == 0)
    {
        /* the script cache was flushed: send the script itself */

        ngx_log_error(NGX_LOG_INFO, r->connection->log, 0,
                      "sbx_rate_limit: NOSCRIPT, sending the script");

        ctx->reloaded = 1;

        if (ngx_http_sbx_rl_redis_send(r, ctx, rlcf, rmcf, 1) == NGX_OK) {
            return;
        }

        /* ctx->cmd is NULL and cmd is ours again */
        ngx_free(cmd);
        ngx_http_sbx_redis_link_failure(link, ctx->probe, "EVAL",
                                        "could not be queued");
        goto fallback;
    }

    ctx->cmd = NULL;
    ngx_free(cmd);

    if (ctx->deadline.timer_set) {
        ngx_del_timer(&ctx->deadline);
    }

    if (rr == NULL) {
        ngx_http_sbx_redis_link_failure(link, ctx->probe, "EVALSHA",
                                        ac->errstr[0] ? ac->errstr
                                                      : "disconnected");
        goto fallback;
    }

    if (rr->type == REDIS_REPLY_ERROR) {
        ngx_http_sbx_redis_link_failure(link, ctx->probe, "EVALSHA",
                                        rr->str);
        goto fallback;
    }

    if (ngx_http_sbx_rl_redis_parse(ctx, rr) != NGX_OK) {
        ngx_http_sbx_redis_link_failure(link, ctx->probe, "EVALSHA",
                                        "unexpected reply");
        goto fallback;
    }

    ngx_http_sbx_redis_link_success(link, ctx->probe);

    ngx_http_sbx_rl_deny_store(ctx, rlcf, rmcf);

    ngx_http_sbx_rl_resume(ctx);
    return;

fallback:

    ctx->cmd = NULL;

    if (ctx->deadline.timer_set) {
        ngx_del_timer(&ctx->deadline);
    }

    ngx_http_sbx_rl_fallback(r, ctx, rlcf, rmcf);
    ngx_http_sbx_rl_resume(ctx);
}


static ngx_int_t
ngx_http_sbx_rl_redis_parse(ngx_http_sbx_rl_ctx_t *ctx, redisReply *rr)
{
    size_t                     j;
    ngx_uint_t                 i;
    redisReply               **e;
    ngx_http_sbx_rl_result_t  *res;

    if (rr->type != REDIS_REPLY_ARRAY
        || rr->elements != 1 + 4 * ctx->nkeys)
    {
        return NGX_ERROR;
    }

    e = rr->element;

    for (j = 0; j < rr->elements; j++) {
        if (e[j]->type != REDIS_REPLY_INTEGER) {
            return NGX_ERROR;
        }
    }

    j = 1;

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated) {
            continue;
        }

        res->allowed = e[j]->integer ? 1 : 0;
        res->remaining = e[j + 1]->integer;
        res->reset = e[j + 2]->integer;
        res->retry_after = e[j + 3]->integer;
        j += 4;
    }

    return NGX_OK;
}


static void
ngx_http_sbx_rl_deadline_handler(ngx_event_t *ev)
{
    ngx_http_request_t           *r;
    ngx_http_sbx_rl_ctx_t        *ctx;
    ngx_http_sbx_rl_loc_conf_t   *rlcf;
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    ctx = ev->data;
    r = ctx->request;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_ratelimit_module);
    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_ratelimit_module);

    if (ctx->cmd) {
        ctx->cmd->ctx = NULL;
        ctx->cmd = NULL;
    }

    ngx_http_sbx_redis_link_failure(&rmcf->link, ctx->probe, "EVALSHA",
                                    "timed out");

    ngx_http_sbx_rl_fallback(r, ctx, rlcf, rmcf);
    ngx_http_sbx_rl_resume(ctx);
}


static void
ngx_http_sbx_rl_fallback(ngx_http_request_t *r, ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    ngx_uint_t           i;
    ngx_http_sbx_ctx_t  *sctx;

    ngx_http_sbx_metrics_fallback();

    ctx->fallback = 1;

    sctx = ngx_http_sbx_get_ctx(r);
    if (sctx) {
        sctx->ratelimit_fallback = 1;
    }

    switch (rlcf->fallback) {

    case NGX_HTTP_SBX_RL_OPEN:
        /* nothing was counted: nothing to report */
        for (i = 0; i < ctx->nlimits; i++) {
            ctx->results[i].evaluated = 0;
            ctx->results[i].allowed = 1;
        }
        break;

    case NGX_HTTP_SBX_RL_CLOSED:
        ctx->unavailable = 1;
        break;

    default: /* NGX_HTTP_SBX_RL_LOCAL */
        ngx_http_sbx_rl_local(ctx, rlcf, rmcf);
        break;
    }
}


static void
ngx_http_sbx_rl_resume(ngx_http_sbx_rl_ctx_t *ctx)
{
    ngx_connection_t    *c;
    ngx_http_request_t  *r;
    ngx_http_sbx_ctx_t  *sctx;

    r = ctx->request;
    c = r->connection;

    ctx->state = NGX_HTTP_SBX_RL_DONE;

    if (ctx->start) {
        sctx = ngx_http_sbx_get_ctx(r);
        if (sctx) {
            sctx->redis_ms = ngx_current_msec - ctx->start;
        }
    }

    ngx_http_core_run_phases(r);
    ngx_http_run_posted_requests(c);
}


/* the request's pool goes away: leave a reply still owed to nobody */

static void
ngx_http_sbx_rl_cleanup(void *data)
{
    ngx_http_sbx_rl_ctx_t *ctx = data;

    if (ctx->cmd) {
        ctx->cmd->ctx = NULL;
        ctx->cmd = NULL;
    }

    if (ctx->deadline.timer_set) {
        ngx_del_timer(&ctx->deadline);
    }
}


/* shared memory: local GCRA and deny cache */

static int64_t
ngx_http_sbx_rl_now(void)
{
    ngx_time_t  *tp;

    tp = ngx_timeofday();

    return (int64_t) tp->sec * 1000000 + (int64_t) tp->msec * 1000;
}


static ngx_http_sbx_rl_node_t *
ngx_http_sbx_rl_lookup(ngx_http_sbx_rl_zone_t *z, ngx_str_t *key,
    ngx_flag_t create, int64_t now)
{
    size_t                   size;
    uint32_t                 hash;
    ngx_str_node_t          *sn;
    ngx_http_sbx_rl_node_t  *node;

    hash = ngx_crc32_short(key->data, key->len);

    sn = ngx_str_rbtree_lookup(&z->sh->rbtree, key, hash);

    if (sn) {
        node = (ngx_http_sbx_rl_node_t *) sn;
        ngx_queue_remove(&node->queue);
        ngx_queue_insert_head(&z->sh->lru, &node->queue);
        return node;
    }

    if (!create) {
        return NULL;
    }

    ngx_http_sbx_rl_expire(z, now, 0);

    size = offsetof(ngx_http_sbx_rl_node_t, data) + key->len;

    node = ngx_slab_alloc_locked(z->shpool, size);

    if (node == NULL) {
        ngx_http_sbx_rl_expire(z, now, 1);

        node = ngx_slab_alloc_locked(z->shpool, size);
        if (node == NULL) {
            return NULL;
        }
    }

    ngx_memcpy(node->data, key->data, key->len);

    node->sn.node.key = hash;
    node->sn.str.len = key->len;
    node->sn.str.data = node->data;
    node->tat = 0;
    node->deny_until = 0;
    node->deny_reset = 0;

    ngx_rbtree_insert(&z->sh->rbtree, &node->sn.node);
    ngx_queue_insert_head(&z->sh->lru, &node->queue);

    return node;
}


/*
 * Removes up to a few least recently used nodes that carry no state any
 * more (idle key, no deny pending); with force, the least recently used
 * ones whatever they hold, to make room.
 */

static void
ngx_http_sbx_rl_expire(ngx_http_sbx_rl_zone_t *z, int64_t now,
    ngx_uint_t force)
{
    ngx_uint_t               n;
    ngx_queue_t             *q;
    ngx_http_sbx_rl_node_t  *node;

    for (n = 0; n < 3; n++) {

        if (ngx_queue_empty(&z->sh->lru)) {
            return;
        }

        q = ngx_queue_last(&z->sh->lru);
        node = ngx_queue_data(q, ngx_http_sbx_rl_node_t, queue);

        if (!force && (node->tat > now || node->deny_until > now)) {
            return;
        }

        ngx_queue_remove(q);
        ngx_rbtree_delete(&z->sh->rbtree, &node->sn.node);
        ngx_slab_free_locked(z->shpool, node);
    }
}


static void
ngx_http_sbx_rl_local(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    int64_t                      now;
    ngx_uint_t                   i, pass;
    ngx_http_sbx_rl_zone_t      *z;
    ngx_http_sbx_rl_node_t      *node, **nodes;
    ngx_http_sbx_rl_limit_t     *limit;
    ngx_http_sbx_rl_result_t    *res;
    ngx_http_sbx_gcra_result_t   g;

    z = rmcf->zone->data;
    limit = rlcf->limits->elts;
    now = ngx_http_sbx_rl_now();
    pass = 1;

    nodes = ngx_pcalloc(ctx->request->pool,
                        ctx->nlimits * sizeof(ngx_http_sbx_rl_node_t *));
    if (nodes == NULL) {
        return;
    }

    ngx_shmtx_lock(&z->shpool->mutex);

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated) {
            continue;
        }

        node = ngx_http_sbx_rl_lookup(z, &res->key, 1, now);

        if (node == NULL) {
            /* the zone is full even after eviction: let it through */
            ngx_log_error(NGX_LOG_ERR, ctx->request->connection->log, 0,
                          "sbx_rate_limit: shared memory zone \"%V\" "
                          "is full", &ngx_http_sbx_rl_zone_name);
            res->allowed = 1;
            res->remaining = limit[i].burst;
            continue;
        }

        nodes[i] = node;

        ngx_http_sbx_gcra(now, node->tat, limit[i].interval, limit[i].dvt,
                          &g);

        res->allowed = g.allowed;
        res->remaining = g.remaining;
        res->reset = g.reset;
        res->retry_after = g.retry_after;

        if (!g.allowed && !limit[i].dry_run) {
            pass = 0;
        }
    }

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (nodes[i] == NULL || !res->allowed) {
            continue;
        }

        if (pass) {
            nodes[i]->tat = now + res->reset;
            continue;
        }

        /* another limit denied: nothing was counted, say so */
        res->reset = ngx_max(nodes[i]->tat, now) - now;
        res->remaining = (limit[i].dvt - res->reset) / limit[i].interval;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);
}


/* NGX_OK: a key of an enforced limit is still denied by Redis's answer */

static ngx_int_t
ngx_http_sbx_rl_deny_cached(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    int64_t                    now;
    ngx_int_t                  rc;
    ngx_uint_t                 i;
    ngx_http_sbx_rl_zone_t    *z;
    ngx_http_sbx_rl_node_t    *node;
    ngx_http_sbx_rl_limit_t   *limit;
    ngx_http_sbx_rl_result_t  *res;

    z = rmcf->zone->data;
    limit = rlcf->limits->elts;
    now = ngx_http_sbx_rl_now();
    rc = NGX_DECLINED;

    ngx_shmtx_lock(&z->shpool->mutex);

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated || limit[i].dry_run) {
            continue;
        }

        node = ngx_http_sbx_rl_lookup(z, &res->key, 0, now);

        if (node == NULL || node->deny_until <= now) {
            continue;
        }

        res->allowed = 0;
        res->remaining = 0;
        res->retry_after = node->deny_until - now;
        res->reset = node->deny_reset > now ? node->deny_reset - now : 0;
        rc = NGX_OK;
    }

    ngx_shmtx_unlock(&z->shpool->mutex);

    if (rc == NGX_OK) {
        /* the other limits were not asked: report them as not counted */
        for (i = 0; i < ctx->nlimits; i++) {
            res = &ctx->results[i];

            if (res->evaluated && res->allowed) {
                res->evaluated = 0;
            }
        }
    }

    return rc;
}


static void
ngx_http_sbx_rl_deny_store(ngx_http_sbx_rl_ctx_t *ctx,
    ngx_http_sbx_rl_loc_conf_t *rlcf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    int64_t                    now;
    ngx_uint_t                 i;
    ngx_http_sbx_rl_zone_t    *z;
    ngx_http_sbx_rl_node_t    *node;
    ngx_http_sbx_rl_limit_t   *limit;
    ngx_http_sbx_rl_result_t  *res;

    z = rmcf->zone->data;
    limit = rlcf->limits->elts;
    now = ngx_http_sbx_rl_now();

    for (i = 0; i < ctx->nlimits; i++) {
        res = &ctx->results[i];

        if (!res->evaluated || res->allowed || limit[i].dry_run
            || res->retry_after <= 0)
        {
            continue;
        }

        ngx_shmtx_lock(&z->shpool->mutex);

        node = ngx_http_sbx_rl_lookup(z, &res->key, 1, now);

        if (node) {
            node->deny_until = now + res->retry_after;
            node->deny_reset = now + res->reset;
        }

        ngx_shmtx_unlock(&z->shpool->mutex);
    }
}


static ngx_int_t
ngx_http_sbx_rl_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_sbx_rl_zone_t *ozone = data;

    size_t                   len;
    ngx_http_sbx_rl_zone_t  *z;

    z = shm_zone->data;

    if (ozone) {
        z->sh = ozone->sh;
        z->shpool = ozone->shpool;
        return NGX_OK;
    }

    z->shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (shm_zone->shm.exists) {
        z->sh = z->shpool->data;
        return NGX_OK;
    }

    z->sh = ngx_slab_alloc(z->shpool, sizeof(ngx_http_sbx_rl_shctx_t));
    if (z->sh == NULL) {
        return NGX_ERROR;
    }

    z->shpool->data = z->sh;

    ngx_rbtree_init(&z->sh->rbtree, &z->sh->sentinel,
                    ngx_str_rbtree_insert_value);
    ngx_queue_init(&z->sh->lru);

    len = sizeof(" in sbx_ratelimit zone \"\"") + shm_zone->shm.name.len;

    z->shpool->log_ctx = ngx_slab_alloc(z->shpool, len);
    if (z->shpool->log_ctx == NULL) {
        return NGX_ERROR;
    }

    ngx_sprintf(z->shpool->log_ctx, " in sbx_ratelimit zone \"%V\"%Z",
                &shm_zone->shm.name);

    z->shpool->log_nomem = 0;

    return NGX_OK;
}


/* $sbx_ratelimit_remaining */

static ngx_int_t
ngx_http_sbx_rl_remaining_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    u_char                 *p;
    ngx_http_sbx_rl_ctx_t  *ctx;

    ctx = ngx_http_sbx_rl_get_ctx(r->main);

    if (ctx == NULL || ctx->remaining < 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    p = ngx_pnalloc(r->pool, NGX_INT_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    v->len = ngx_sprintf(p, "%i", ctx->remaining) - p;
    v->data = p;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


/* configuration */

/*
 * sbx_rate_limit key=VALUE rate=N r/s|r/m|r/h [burst=N] [name=S]
 *                [dry_run];
 * ("rate=10r/s" is accepted as well as "rate=10 r/s")
 */

static char *
ngx_http_sbx_rate_limit(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_rl_loc_conf_t *rlcf = conf;

    u_char                            *p, *last;
    ngx_int_t                          rc;
    ngx_str_t                         *value, rate, unit, key, burst;
    ngx_uint_t                         i, j;
    ngx_http_sbx_rl_limit_t           *limit, *other;
    ngx_http_sbx_gcra_limit_t          g;
    ngx_http_sbx_rl_main_conf_t       *rmcf;
    ngx_http_compile_complex_value_t   ccv;

    value = cf->args->elts;

    if (rlcf->limits == NGX_CONF_UNSET_PTR) {
        rlcf->limits = ngx_array_create(cf->pool, 2,
                                        sizeof(ngx_http_sbx_rl_limit_t));
        if (rlcf->limits == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    limit = ngx_array_push(rlcf->limits);
    if (limit == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(limit, sizeof(ngx_http_sbx_rl_limit_t));

    ngx_str_null(&key);
    ngx_str_null(&rate);
    ngx_str_null(&unit);
    ngx_str_null(&burst);

    if (ngx_http_sbx_params_unique(cf, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "key=", 4) == 0) {
            key.data = value[i].data + 4;
            key.len = value[i].len - 4;
            continue;
        }

        if (ngx_strncmp(value[i].data, "rate=", 5) == 0) {
            rate.data = value[i].data + 5;
            rate.len = value[i].len - 5;

            /* "rate=N r/s": the unit is the next argument */
            if (i + 1 < cf->args->nelts && value[i + 1].len == 3
                && value[i + 1].data[0] == 'r'
                && value[i + 1].data[1] == '/')
            {
                unit = value[++i];
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "burst=", 6) == 0) {
            burst.data = value[i].data + 6;
            burst.len = value[i].len - 6;
            continue;
        }

        if (ngx_strncmp(value[i].data, "name=", 5) == 0) {
            limit->name.data = value[i].data + 5;
            limit->name.len = value[i].len - 5;

            if (limit->name.len == 0
                || limit->name.len > NGX_HTTP_SBX_RL_NAME_MAX)
            {
                goto bad_name;
            }

            for (j = 0; j < limit->name.len; j++) {
                p = &limit->name.data[j];

                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')
                      || (*p >= '0' && *p <= '9')
                      || *p == '_' || *p == '-' || *p == '.'))
                {
                    goto bad_name;
                }
            }

            continue;
        }

        if (ngx_strcmp(value[i].data, "dry_run") == 0) {
            limit->dry_run = 1;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_rate_limit\": unknown parameter \"%V\", "
                           "expected key=, rate=, burst=, name= or dry_run",
                           &value[i]);
        return NGX_CONF_ERROR;
    }

    if (key.data == NULL || rate.data == NULL) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_rate_limit\": key=VALUE and "
                           "rate=N r/s|r/m|r/h are required");
        return NGX_CONF_ERROR;
    }

    if (key.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_rate_limit\": key= is empty, expected "
                           "a value such as key=$binary_remote_addr");
        return NGX_CONF_ERROR;
    }

    /* "N r/u" or "Nr/u" */

    rc = ngx_http_sbx_gcra_parse(rate.data, rate.len, unit.data, unit.len,
                                 burst.data, burst.len, &g);

    if (rc == -1) {
        goto bad_rate;
    }

    if (rc != 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_rate_limit\": invalid \"burst=%V\", "
                           "expected burst=N with 1 <= N <= %d",
                           &burst, NGX_HTTP_SBX_GCRA_MAX);
        return NGX_CONF_ERROR;
    }

    limit->period = (ngx_uint_t) g.period;
    limit->count = (ngx_uint_t) g.count;
    limit->burst = (ngx_uint_t) g.burst;
    limit->interval = g.interval;
    limit->dvt = g.dvt;

    if (limit->name.len == 0) {
        p = ngx_pnalloc(cf->pool, NGX_INT_T_LEN * 2 + sizeof("-per-x-b"));
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        limit->name.data = p;

        if (burst.data) {
            p = ngx_sprintf(p, "%ui-per-%c-b%ui", limit->count, g.unit,
                            limit->burst);

        } else {
            p = ngx_sprintf(p, "%ui-per-%c", limit->count, g.unit);
        }

        limit->name.len = p - limit->name.data;
    }

    other = rlcf->limits->elts;

    for (j = 0; j + 1 < rlcf->limits->nelts; j++) {
        if (other[j].name.len == limit->name.len
            && ngx_strncmp(other[j].name.data, limit->name.data,
                           limit->name.len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"sbx_rate_limit\": duplicate limit name "
                               "\"%V\" in this location, give each limit "
                               "its own name=", &limit->name);
            return NGX_CONF_ERROR;
        }
    }

    /* the script's ARGV for this limit */

    p = ngx_pnalloc(cf->pool, 2 * NGX_INT64_LEN + 4);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    limit->argv.data = p;
    last = ngx_sprintf(p, "%L", limit->interval);
    limit->interval_len = last - p;
    *last++ = '\0';
    p = last;
    last = ngx_sprintf(p, "%L", limit->dvt);
    limit->dvt_len = last - p;
    *last++ = '\0';
    *last++ = limit->dry_run ? '0' : '1';
    limit->argv.len = last - limit->argv.data;

    ngx_memzero(&ccv, sizeof(ngx_http_compile_complex_value_t));

    ccv.cf = cf;
    ccv.value = &key;
    ccv.complex_value = &limit->key;

    if (ngx_http_compile_complex_value(&ccv) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    rmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_sbx_ratelimit_module);

    if (ngx_http_sbx_rl_add_zone(cf, rmcf) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;

bad_rate:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"sbx_rate_limit\": invalid rate \"%V%s%V\", "
                       "expected rate=N r/s, r/m or r/h with "
                       "1 <= N <= 1000000", &rate,
                       unit.data && unit.data != rate.data + rate.len
                       ? " " : "", &unit);
    return NGX_CONF_ERROR;

bad_name:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "\"sbx_rate_limit\": invalid name \"%V\", expected "
                       "1 to %d characters of A-Z a-z 0-9 _ - .",
                       &limit->name, NGX_HTTP_SBX_RL_NAME_MAX);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_sbx_rate_limit_fallback(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_sbx_rl_loc_conf_t *rlcf = conf;

    ngx_str_t  *value;

    if (rlcf->fallback != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "local") == 0) {
        rlcf->fallback = NGX_HTTP_SBX_RL_LOCAL;

    } else if (ngx_strcmp(value[1].data, "open") == 0) {
        rlcf->fallback = NGX_HTTP_SBX_RL_OPEN;

    } else if (ngx_strcmp(value[1].data, "closed") == 0) {
        rlcf->fallback = NGX_HTTP_SBX_RL_CLOSED;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_rate_limit_fallback\": invalid value "
                           "\"%V\", expected local, open or closed",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


/*
 * sbx_redis ADDR [password=S] [db=N] [connect_timeout=T] [timeout=T]
 *           [prefix=S];
 * ADDR is host:port or unix:/path.
 */

static char *
ngx_http_sbx_redis(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_rl_main_conf_t *rmcf = conf;

    u_char                     *p;
    ngx_str_t                  *value, s;
    ngx_url_t                   u;
    ngx_int_t                   n;
    ngx_uint_t                  i;
    ngx_msec_t                  ms;
    ngx_http_sbx_redis_conf_t  *rc;

    if (rmcf->redis) {
        return "is duplicate";
    }

    value = cf->args->elts;

    rc = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_redis_conf_t));
    if (rc == NULL) {
        return NGX_CONF_ERROR;
    }

    rc->addr = value[1];
    rc->connect_timeout = 1000;
    rc->timeout = 50;
    ngx_str_set(&rc->prefix, "sbx:rl:");

    if (value[1].len > 5 && ngx_strncmp(value[1].data, "unix:", 5) == 0) {
        rc->unix_path.len = value[1].len - 5;
        rc->unix_path.data = ngx_pnalloc(cf->pool, rc->unix_path.len + 1);
        if (rc->unix_path.data == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_cpystrn(rc->unix_path.data, value[1].data + 5,
                    rc->unix_path.len + 1);

    } else {
        ngx_memzero(&u, sizeof(ngx_url_t));

        u.url = value[1];
        u.no_resolve = 0;

        if (ngx_parse_url(cf->pool, &u) != NGX_OK || u.no_port
            || u.naddrs == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"sbx_redis\": invalid address \"%V\"%s%s, "
                               "expected host:port or unix:/path",
                               &value[1], u.err ? ": " : "",
                               u.err ? u.err : "");
            return NGX_CONF_ERROR;
        }

        /* numeric, so that hiredis never resolves a name in a worker */

        rc->host.data = ngx_pnalloc(cf->pool, NGX_SOCKADDR_STRLEN + 1);
        if (rc->host.data == NULL) {
            return NGX_CONF_ERROR;
        }

        rc->host.len = ngx_sock_ntop(u.addrs[0].sockaddr,
                                     u.addrs[0].socklen, rc->host.data,
                                     NGX_SOCKADDR_STRLEN, 0);
        rc->host.data[rc->host.len] = '\0';

        /* "[::1]" from ngx_sock_ntop: hiredis wants "::1" */
        if (rc->host.data[0] == '[') {
            rc->host.data++;
            rc->host.len -= 2;
            rc->host.data[rc->host.len] = '\0';
        }

        rc->port = u.port;
    }

    if (ngx_http_sbx_params_unique(cf, 2) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "password=", 9) == 0) {
            rc->password.data = value[i].data + 9;
            rc->password.len = value[i].len - 9;
            continue;
        }

        if (ngx_strncmp(value[i].data, "db=", 3) == 0) {
            n = ngx_atoi(value[i].data + 3, value[i].len - 3);
            if (n == NGX_ERROR) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"sbx_redis\": invalid \"%V\", "
                                   "expected db=N with N >= 0", &value[i]);
                return NGX_CONF_ERROR;
            }

            rc->db = n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "connect_timeout=", 16) == 0
            || ngx_strncmp(value[i].data, "timeout=", 8) == 0)
        {
            p = ngx_strlchr(value[i].data, value[i].data + value[i].len,
                            '=') + 1;
            s.data = p;
            s.len = value[i].data + value[i].len - p;

            ms = ngx_parse_time(&s, 0);
            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"sbx_redis\": invalid \"%V\", "
                                   "expected a time such as 50ms or 1s",
                                   &value[i]);
                return NGX_CONF_ERROR;
            }

            if (value[i].data[0] == 'c') {
                rc->connect_timeout = ms;

            } else {
                rc->timeout = ms;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "prefix=", 7) == 0) {
            rc->prefix.data = value[i].data + 7;
            rc->prefix.len = value[i].len - 7;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_redis\": unknown parameter \"%V\", "
                           "expected password=, db=, connect_timeout=, "
                           "timeout= or prefix=", &value[i]);
        return NGX_CONF_ERROR;
    }

    /* the password is sent as an argument: keep it NUL-free and ended */
    if (rc->password.len) {
        p = ngx_pnalloc(cf->pool, rc->password.len + 1);
        if (p == NULL) {
            return NGX_CONF_ERROR;
        }

        ngx_cpystrn(p, rc->password.data, rc->password.len + 1);
        rc->password.data = p;
    }

    rmcf->redis = rc;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sbx_rl_add_zone(ngx_conf_t *cf, ngx_http_sbx_rl_main_conf_t *rmcf)
{
    ngx_http_sbx_rl_zone_t  *z;

    if (rmcf->zone) {
        return NGX_OK;
    }

    z = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_rl_zone_t));
    if (z == NULL) {
        return NGX_ERROR;
    }

    rmcf->zone = ngx_shared_memory_add(cf, &ngx_http_sbx_rl_zone_name,
                                       NGX_HTTP_SBX_RL_ZONE_SIZE,
                                       &ngx_http_sbx_ratelimit_module);
    if (rmcf->zone == NULL) {
        return NGX_ERROR;
    }

    rmcf->zone->init = ngx_http_sbx_rl_init_zone;
    rmcf->zone->data = z;

    return NGX_OK;
}


static ngx_http_variable_t  ngx_http_sbx_rl_vars[] = {

    { ngx_string("sbx_ratelimit_remaining"), NULL,
      ngx_http_sbx_rl_remaining_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_sbx_rl_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_sbx_rl_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_rl_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    /*
     * Handlers of a phase run last registered first: the residency
     * module is listed after this one, so its check runs before.
     */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_rl_handler;

    return NGX_OK;
}


static void *
ngx_http_sbx_rl_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    rmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_rl_main_conf_t));
    if (rmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     rmcf->redis = NULL;
     *     rmcf->zone = NULL;
     */

    return rmcf;
}


static char *
ngx_http_sbx_rl_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_sbx_rl_main_conf_t *rmcf = conf;

    u_char        md[EVP_MAX_MD_SIZE];
    unsigned int  mdlen;

    rmcf->script.data = (u_char *) ngx_http_sbx_rl_script;
    rmcf->script.len = sizeof(ngx_http_sbx_rl_script) - 1;

    if (EVP_Digest(rmcf->script.data, rmcf->script.len, md, &mdlen,
                   EVP_sha1(), NULL)
        != 1 || mdlen != 20)
    {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sbx_rate_limit: SHA-1 of the script failed");
        return NGX_CONF_ERROR;
    }

    ngx_hex_dump(rmcf->sha, md, 20);

    return NGX_CONF_OK;
}


static void *
ngx_http_sbx_rl_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_rl_loc_conf_t  *rlcf;

    rlcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_rl_loc_conf_t));
    if (rlcf == NULL) {
        return NULL;
    }

    rlcf->limits = NGX_CONF_UNSET_PTR;
    rlcf->fallback = NGX_CONF_UNSET_UINT;

    return rlcf;
}


static char *
ngx_http_sbx_rl_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_sbx_rl_loc_conf_t *prev = parent;
    ngx_http_sbx_rl_loc_conf_t *conf = child;

    u_char                   *p;
    size_t                    len;
    int64_t                   w;
    ngx_uint_t                i;
    ngx_http_sbx_rl_limit_t  *limit;

    ngx_conf_merge_ptr_value(conf->limits, prev->limits, NULL);
    ngx_conf_merge_uint_value(conf->fallback, prev->fallback,
                              NGX_HTTP_SBX_RL_LOCAL);

    if (conf->limits == NULL || conf->policy.len) {
        return NGX_CONF_OK;
    }

    if (conf->limits == prev->limits && prev->policy.len) {
        conf->policy = prev->policy;
        return NGX_CONF_OK;
    }

    limit = conf->limits->elts;
    len = 0;

    for (i = 0; i < conf->limits->nelts; i++) {
        len += sizeof("\"\";q=;w=, ") - 1 + limit[i].name.len
               + 2 * NGX_INT64_LEN;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    conf->policy.data = p;

    for (i = 0; i < conf->limits->nelts; i++) {
        if (i) {
            *p++ = ','; *p++ = ' ';
        }

        w = ngx_http_sbx_gcra_seconds(limit[i].dvt);

        p = ngx_sprintf(p, "\"%V\";q=%ui;w=%L", &limit[i].name,
                        limit[i].burst, w);
    }

    conf->policy.len = p - conf->policy.data;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sbx_rl_init_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_sbx_ratelimit_module);

    if (rmcf == NULL || rmcf->redis == NULL || rmcf->zone == NULL) {
        return NGX_OK;
    }

    return ngx_http_sbx_redis_link_init(&rmcf->link, rmcf->redis,
                                        &rmcf->script, cycle->log);
}


static void
ngx_http_sbx_rl_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_rl_main_conf_t  *rmcf;

    rmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_sbx_ratelimit_module);

    if (rmcf == NULL || rmcf->redis == NULL || rmcf->zone == NULL) {
        return;
    }

    ngx_http_sbx_redis_link_close(&rmcf->link);
}
