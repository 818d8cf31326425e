/*
 * ngx_http_sbx_metrics.c: metrics and the connector catalog (DESIGN.md
 * section 8).
 *
 * Collecting is apart from rendering.  Counters live in one shared zone,
 * "sbx_metrics", of a fixed size, created whenever the module is loaded:
 * the functions other files call are safe without any sbx_status location,
 * and since the size never changes nginx hands the same zone to the next
 * cycle on reload, so counters survive it.  Records are found by name
 * (connector, pool) when a cycle starts and indexed by connector->seq and
 * pool->index from then on; counters are atomics, the zone's mutex only
 * guards allocation and the claim of a worker slot.
 *
 * Rendering walks ngx_http_sbx_metrics[], the one table of metric names,
 * types and help strings, into Prometheus text exposition 0.0.4 or JSON.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"
#include "ngx_http_sbx_metrics.h"


#define NGX_HTTP_SBX_METRICS_ZONE_SIZE  (1024 * 1024)
#define NGX_HTTP_SBX_METRICS_WORKERS    256
#define NGX_HTTP_SBX_NBUCKETS           11


typedef struct ngx_http_sbx_metrics_conn_s  ngx_http_sbx_metrics_conn_t;
typedef struct ngx_http_sbx_metrics_pool_s  ngx_http_sbx_metrics_pool_t;


struct ngx_http_sbx_metrics_conn_s {
    ngx_http_sbx_metrics_conn_t  *next;
    ngx_atomic_t                  requests[NGX_HTTP_SBX_NDECISIONS];
    ngx_atomic_t                  buckets[NGX_HTTP_SBX_NBUCKETS];
    ngx_atomic_t                  count;
    ngx_atomic_t                  sum_ms;
    size_t                        len;
    u_char                        name[1];
};


/* one per worker process that reported a pool's gauges */
typedef struct {
    ngx_atomic_t                  pid;
    ngx_atomic_t                  helpers;
    ngx_atomic_t                  queued;
} ngx_http_sbx_metrics_slot_t;


struct ngx_http_sbx_metrics_pool_s {
    ngx_http_sbx_metrics_pool_t  *next;
    ngx_atomic_t                  restarts[NGX_HTTP_SBX_NRESTART_REASONS];
    ngx_http_sbx_metrics_slot_t   slots[NGX_HTTP_SBX_METRICS_WORKERS];
    size_t                        len;
    u_char                        name[1];
};


typedef struct {
    ngx_http_sbx_metrics_conn_t  *conns;
    ngx_http_sbx_metrics_pool_t  *pools;
    ngx_atomic_t                  redis_errors;
    ngx_atomic_t                  fallbacks;
    ngx_atomic_t                  dry_runs[NGX_HTTP_SBX_NDRY_RUN_CHECKS];
} ngx_http_sbx_metrics_shctx_t;


typedef struct {
    ngx_shm_zone_t               *shm_zone;
    ngx_slab_pool_t              *shpool;
    ngx_http_sbx_metrics_shctx_t *sh;

    ngx_http_sbx_main_conf_t     *smcf;

    /* this cycle's records: by connector->seq and pool->index */
    ngx_http_sbx_metrics_conn_t **conns;
    ngx_uint_t                    nconns;
    ngx_http_sbx_metrics_pool_t **pools;
    ngx_uint_t                    npools;

    /* worker-local: the slot this worker claimed, per pool */
    ngx_uint_t                   *slot;
    ngx_flag_t                    exiting;

} ngx_http_sbx_metrics_main_conf_t;


typedef struct {
    ngx_uint_t                    handler;        /* status or catalog */
} ngx_http_sbx_metrics_loc_conf_t;


/* output being built: a chain of buffers, Prometheus text or JSON */
typedef struct {
    ngx_http_request_t           *request;
    ngx_chain_t                  *out;
    ngx_chain_t                 **last;
    ngx_buf_t                    *buf;
    ngx_uint_t                    json;
    ngx_uint_t                    nsamples;       /* in the current family */
    ngx_int_t                     rc;
} ngx_http_sbx_out_t;


typedef void (*ngx_http_sbx_metric_render_pt)(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);

typedef struct {
    ngx_str_t                     name;
    ngx_str_t                     type;
    ngx_str_t                     help;
    ngx_http_sbx_metric_render_pt render;
} ngx_http_sbx_metric_t;


#define NGX_HTTP_SBX_HANDLER_STATUS   1
#define NGX_HTTP_SBX_HANDLER_CATALOG  2


static void ngx_http_sbx_render_requests(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_duration(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_helpers(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_restarts(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_queue(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_redis_errors(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_dry_runs(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);
static void ngx_http_sbx_render_fallbacks(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name);

static ngx_http_sbx_metrics_main_conf_t *ngx_http_sbx_metrics_get(void);
static ngx_http_sbx_metrics_pool_t *ngx_http_sbx_metrics_pool_get(
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_http_sbx_pool_t *pool);
static ngx_int_t ngx_http_sbx_metrics_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_status_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_catalog_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_send(ngx_http_request_t *r,
    ngx_http_sbx_out_t *o, ngx_str_t *type);

static u_char *ngx_http_sbx_out_reserve(ngx_http_sbx_out_t *o, size_t size);
static void ngx_http_sbx_out_printf(ngx_http_sbx_out_t *o,
    const char *fmt, ...);
static void ngx_http_sbx_out_json_str(ngx_http_sbx_out_t *o, ngx_str_t *s);
static void ngx_http_sbx_sample(ngx_http_sbx_out_t *o, ngx_str_t *name,
    const char *suffix, ngx_str_t *labels, ngx_uint_t nlabels,
    u_char *value, size_t len);
static void ngx_http_sbx_sample_n(ngx_http_sbx_out_t *o, ngx_str_t *name,
    const char *suffix, ngx_str_t *labels, ngx_uint_t nlabels,
    ngx_atomic_uint_t n);

static ngx_int_t ngx_http_sbx_metrics_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);

static void *ngx_http_sbx_metrics_create_main_conf(ngx_conf_t *cf);
static void *ngx_http_sbx_metrics_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_metrics_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static char *ngx_http_sbx_status(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_sbx_metrics_init(ngx_conf_t *cf);
static void ngx_http_sbx_metrics_exit_process(ngx_cycle_t *cycle);


/* the one table of metric families: names, types and help strings */
static ngx_http_sbx_metric_t  ngx_http_sbx_metrics[] = {

    { ngx_string("sbx_requests_total"),
      ngx_string("counter"),
      ngx_string("Requests to connector routes, by connector and decision."),
      ngx_http_sbx_render_requests },

    { ngx_string("sbx_request_duration_seconds"),
      ngx_string("histogram"),
      ngx_string("Duration of requests to connector routes, by connector."),
      ngx_http_sbx_render_duration },

    { ngx_string("sbx_helpers"),
      ngx_string("gauge"),
      ngx_string("Helper processes running, by pool, summed over workers."),
      ngx_http_sbx_render_helpers },

    { ngx_string("sbx_helper_restarts_total"),
      ngx_string("counter"),
      ngx_string("Helper processes replaced, by pool and reason."),
      ngx_http_sbx_render_restarts },

    { ngx_string("sbx_queue_depth"),
      ngx_string("gauge"),
      ngx_string("Requests waiting for a helper, by pool, summed over "
                 "workers."),
      ngx_http_sbx_render_queue },

    { ngx_string("sbx_redis_errors_total"),
      ngx_string("counter"),
      ngx_string("Redis errors seen by the rate limiter."),
      ngx_http_sbx_render_redis_errors },

    { ngx_string("sbx_ratelimit_fallback_total"),
      ngx_string("counter"),
      ngx_string("Rate limit decisions taken by the fallback while Redis "
                 "was unreachable."),
      ngx_http_sbx_render_fallbacks },

    { ngx_string("sbx_dry_run_denials_total"),
      ngx_string("counter"),
      ngx_string("Requests a dry-run rule would have denied, by check."),
      ngx_http_sbx_render_dry_runs },

    { ngx_null_string, ngx_null_string, ngx_null_string, NULL }
};


/* histogram bounds: milliseconds and their "le" label */
static ngx_msec_t  ngx_http_sbx_bucket_ms[NGX_HTTP_SBX_NBUCKETS] = {
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000
};

static ngx_str_t  ngx_http_sbx_bucket_le[NGX_HTTP_SBX_NBUCKETS] = {
    ngx_string("0.005"), ngx_string("0.01"), ngx_string("0.025"),
    ngx_string("0.05"), ngx_string("0.1"), ngx_string("0.25"),
    ngx_string("0.5"), ngx_string("1"), ngx_string("2.5"),
    ngx_string("5"), ngx_string("10")
};


/* label values of sbx_helper_restarts_total{reason}: NGX_HTTP_SBX_RESTART_* */
static ngx_str_t  ngx_http_sbx_restart_reasons[NGX_HTTP_SBX_NRESTART_REASONS] =
{
    ngx_string("exit"),
    ngx_string("signal"),
    ngx_string("seccomp"),
    ngx_string("timeout"),
    ngx_string("recycle"),
    ngx_string("startup")
};


/* label values of sbx_dry_run_denials_total{check}: NGX_HTTP_SBX_DRY_RUN_* */
static ngx_str_t  ngx_http_sbx_dry_run_checks[NGX_HTTP_SBX_NDRY_RUN_CHECKS] = {
    ngx_string("residency"),
    ngx_string("ratelimit")
};


static ngx_str_t  ngx_http_sbx_state_names[] = {
    ngx_string("beta"),
    ngx_string("ga"),
    ngx_string("deprecated"),
    ngx_string("retired")
};


static ngx_str_t  ngx_http_sbx_metrics_zone_name = ngx_string("sbx_metrics");


static ngx_command_t  ngx_http_sbx_metrics_commands[] = {

    { ngx_string("sbx_status"),
      NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_sbx_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) NGX_HTTP_SBX_HANDLER_STATUS },

    { ngx_string("sbx_catalog"),
      NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_NOARGS,
      ngx_http_sbx_status,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      (void *) NGX_HTTP_SBX_HANDLER_CATALOG },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_metrics_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_sbx_metrics_init,             /* postconfiguration */

    ngx_http_sbx_metrics_create_main_conf, /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sbx_metrics_create_loc_conf,  /* create location configuration */
    ngx_http_sbx_metrics_merge_loc_conf    /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_metrics_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_metrics_module_ctx,      /* module context */
    ngx_http_sbx_metrics_commands,         /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_sbx_metrics_exit_process,     /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* collecting: the interface of ngx_http_sbx_module.h */

static ngx_http_sbx_metrics_main_conf_t *
ngx_http_sbx_metrics_get(void)
{
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_cycle_get_module_main_conf(ngx_cycle,
                                               ngx_http_sbx_metrics_module);

    if (mmcf == NULL || mmcf->sh == NULL) {
        return NULL;
    }

    return mmcf;
}


static ngx_http_sbx_metrics_pool_t *
ngx_http_sbx_metrics_pool_get(ngx_http_sbx_metrics_main_conf_t *mmcf,
    ngx_http_sbx_pool_t *pool)
{
    if (pool == NULL || pool->index >= mmcf->npools) {
        return NULL;
    }

    return mmcf->pools[pool->index];
}


void
ngx_http_sbx_metrics_pool(ngx_http_sbx_pool_t *pool, ngx_uint_t helpers,
    ngx_uint_t queued)
{
    ngx_uint_t                         i, n;
    ngx_http_sbx_metrics_slot_t       *slot;
    ngx_http_sbx_metrics_pool_t       *mp;
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_sbx_metrics_get();
    if (mmcf == NULL || mmcf->exiting) {
        return;
    }

    mp = ngx_http_sbx_metrics_pool_get(mmcf, pool);
    if (mp == NULL) {
        return;
    }

    n = mmcf->slot[pool->index];

    if (n >= NGX_HTTP_SBX_METRICS_WORKERS
        || mp->slots[n].pid != (ngx_atomic_uint_t) ngx_pid)
    {
        /* claim a free slot, or one whose process is gone */

        n = NGX_HTTP_SBX_METRICS_WORKERS;

        ngx_shmtx_lock(&mmcf->shpool->mutex);

        for (i = 0; i < NGX_HTTP_SBX_METRICS_WORKERS; i++) {
            slot = &mp->slots[i];

            if (slot->pid == 0
                || slot->pid == (ngx_atomic_uint_t) ngx_pid
                || (kill((ngx_pid_t) slot->pid, 0) == -1 && errno == ESRCH))
            {
                slot->pid = ngx_pid;
                slot->helpers = 0;
                slot->queued = 0;
                n = i;
                break;
            }
        }

        ngx_shmtx_unlock(&mmcf->shpool->mutex);

        if (n == NGX_HTTP_SBX_METRICS_WORKERS) {
            return;
        }

        mmcf->slot[pool->index] = n;
    }

    mp->slots[n].helpers = helpers;
    mp->slots[n].queued = queued;
}


void
ngx_http_sbx_metrics_restart(ngx_http_sbx_pool_t *pool, ngx_uint_t reason)
{
    ngx_http_sbx_metrics_pool_t       *mp;
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_sbx_metrics_get();
    if (mmcf == NULL || reason >= NGX_HTTP_SBX_NRESTART_REASONS) {
        return;
    }

    mp = ngx_http_sbx_metrics_pool_get(mmcf, pool);
    if (mp == NULL) {
        return;
    }

    (void) ngx_atomic_fetch_add(&mp->restarts[reason], 1);
}


void
ngx_http_sbx_metrics_redis_error(void)
{
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_sbx_metrics_get();
    if (mmcf == NULL) {
        return;
    }

    (void) ngx_atomic_fetch_add(&mmcf->sh->redis_errors, 1);
}


void
ngx_http_sbx_metrics_fallback(void)
{
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_sbx_metrics_get();
    if (mmcf == NULL) {
        return;
    }

    (void) ngx_atomic_fetch_add(&mmcf->sh->fallbacks, 1);
}


void
ngx_http_sbx_metrics_dry_run(ngx_uint_t check)
{
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_http_sbx_metrics_get();
    if (mmcf == NULL || check >= NGX_HTTP_SBX_NDRY_RUN_CHECKS) {
        return;
    }

    (void) ngx_atomic_fetch_add(&mmcf->sh->dry_runs[check], 1);
}


/* helpers shared with the audit module (ngx_http_sbx_metrics.h) */

ngx_http_sbx_ctx_t *
ngx_http_sbx_log_ctx(ngx_http_request_t *r)
{
    ngx_http_sbx_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_sbx_module);

    if (ctx == NULL || ctx->connector == NULL) {
        return NULL;
    }

    return ctx;
}


ngx_uint_t
ngx_http_sbx_log_decision(ngx_http_sbx_ctx_t *ctx)
{
    if (!ctx->decided || (ngx_uint_t) ctx->decision >= NGX_HTTP_SBX_NDECISIONS)
    {
        return NGX_HTTP_SBX_ALLOWED;
    }

    return ctx->decision;
}


ngx_msec_t
ngx_http_sbx_request_ms(ngx_http_request_t *r)
{
    ngx_time_t      *tp;
    ngx_msec_int_t   ms;

    tp = ngx_timeofday();

    ms = (ngx_msec_int_t) ((tp->sec - r->start_sec) * 1000
                           + (tp->msec - r->start_msec));

    return (ngx_msec_t) ngx_max(ms, 0);
}


u_char *
ngx_http_sbx_json_str(u_char *dst, u_char *src, size_t len)
{
    u_char     *p, *q, *last, *next;
    uint32_t    ch;
    static u_char  hex[] = "0123456789abcdef";

    *dst++ = '"';

    p = src;
    last = src + len;

    while (p < last) {
        ch = *p;

        if (ch >= 0x80) {
            next = p;
            ch = ngx_utf8_decode(&next, last - p);

            /*
             * invalid, truncated, beyond U+10FFFF or a UTF-16 surrogate;
             * ngx_utf8_decode() takes any byte >= 0x80 as a continuation
             */

            for (q = p + 1; q < next && ch <= 0x10ffff; q++) {
                if (*q >= 0xc0) {
                    ch = 0xffffffff;
                }
            }

            if (ch > 0x10ffff || (ch >= 0xd800 && ch <= 0xdfff)) {
                dst = ngx_cpymem(dst, "\\ufffd", 6);
                p++;
                continue;
            }

            dst = ngx_cpymem(dst, p, next - p);
            p = next;
            continue;
        }

        p++;

        switch (ch) {

        case '"':
        case '\\':
            *dst++ = '\\';
            *dst++ = (u_char) ch;
            break;

        case '\n':
            *dst++ = '\\'; *dst++ = 'n';
            break;

        case '\r':
            *dst++ = '\\'; *dst++ = 'r';
            break;

        case '\t':
            *dst++ = '\\'; *dst++ = 't';
            break;

        default:
            if (ch < 0x20 || ch == 0x7f) {
                dst = ngx_cpymem(dst, "\\u00", 4);
                *dst++ = hex[ch >> 4];
                *dst++ = hex[ch & 0xf];

            } else {
                *dst++ = (u_char) ch;
            }
        }
    }

    *dst++ = '"';

    return dst;
}


/* log phase: request counters and the duration histogram */

static ngx_int_t
ngx_http_sbx_metrics_log_handler(ngx_http_request_t *r)
{
    ngx_uint_t                         i;
    ngx_msec_t                         ms;
    ngx_http_sbx_ctx_t                *ctx;
    ngx_http_sbx_metrics_conn_t       *mc;
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    /* a subrequest (log_subrequest on) is counted with its main request */

    if (r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_sbx_log_ctx(r);
    if (ctx == NULL) {
        return NGX_OK;
    }

    mmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_metrics_module);

    if (mmcf->sh == NULL || ctx->connector->seq >= mmcf->nconns) {
        return NGX_OK;
    }

    mc = mmcf->conns[ctx->connector->seq];
    if (mc == NULL) {
        return NGX_OK;
    }

    (void) ngx_atomic_fetch_add(&mc->requests[ngx_http_sbx_log_decision(ctx)],
                                1);

    ms = ngx_http_sbx_request_ms(r);

    for (i = 0; i < NGX_HTTP_SBX_NBUCKETS; i++) {
        if (ms <= ngx_http_sbx_bucket_ms[i]) {
            (void) ngx_atomic_fetch_add(&mc->buckets[i], 1);
            break;
        }
    }

    (void) ngx_atomic_fetch_add(&mc->sum_ms, ms);
    (void) ngx_atomic_fetch_add(&mc->count, 1);

    return NGX_OK;
}


/* rendering */

static u_char *
ngx_http_sbx_out_reserve(ngx_http_sbx_out_t *o, size_t size)
{
    ngx_buf_t    *b;
    ngx_chain_t  *cl;

    if (o->rc != NGX_OK) {
        return NULL;
    }

    if (o->buf && (size_t) (o->buf->end - o->buf->last) >= size) {
        return o->buf->last;
    }

    b = ngx_create_temp_buf(o->request->pool, ngx_max(size, 16384));
    if (b == NULL) {
        o->rc = NGX_ERROR;
        return NULL;
    }

    cl = ngx_alloc_chain_link(o->request->pool);
    if (cl == NULL) {
        o->rc = NGX_ERROR;
        return NULL;
    }

    cl->buf = b;
    cl->next = NULL;
    *o->last = cl;
    o->last = &cl->next;
    o->buf = b;

    return b->last;
}


/* short, fixed texts and numbers only: strings go through _json_str */

static void
ngx_http_sbx_out_printf(ngx_http_sbx_out_t *o, const char *fmt, ...)
{
    u_char   *p;
    va_list   args;

    p = ngx_http_sbx_out_reserve(o, 512);
    if (p == NULL) {
        return;
    }

    va_start(args, fmt);
    o->buf->last = ngx_vslprintf(p, o->buf->end, fmt, args);
    va_end(args);
}


static void
ngx_http_sbx_out_json_str(ngx_http_sbx_out_t *o, ngx_str_t *s)
{
    u_char  *p;

    p = ngx_http_sbx_out_reserve(o, ngx_http_sbx_json_str_len(s->len));
    if (p == NULL) {
        return;
    }

    o->buf->last = ngx_http_sbx_json_str(p, s->data, s->len);
}


static void
ngx_http_sbx_out_label(ngx_http_sbx_out_t *o, ngx_str_t *s)
{
    u_char  *p, *q, *last;

    p = ngx_http_sbx_out_reserve(o, 2 * s->len);
    if (p == NULL) {
        return;
    }

    last = s->data + s->len;

    for (q = s->data; q < last; q++) {
        switch (*q) {

        case '\\':
        case '"':
            *p++ = '\\';
            *p++ = *q;
            break;

        case '\n':
            *p++ = '\\';
            *p++ = 'n';
            break;

        default:
            *p++ = *q;
        }
    }

    o->buf->last = p;
}


/*
 * One sample: labels holds nlabels name/value pairs.  Text:
 *     name_suffix{l="v",...} value
 * JSON, within the family's "samples" array:
 *     {"name":"name_suffix","labels":{"l":"v"},"value":value}
 */

static void
ngx_http_sbx_sample(ngx_http_sbx_out_t *o, ngx_str_t *name,
    const char *suffix, ngx_str_t *labels, ngx_uint_t nlabels,
    u_char *value, size_t len)
{
    ngx_uint_t  i;

    if (o->json) {
        ngx_http_sbx_out_printf(o, "%s{\"name\":\"%V%s\",\"labels\":{",
                                o->nsamples ? "," : "", name, suffix);

        for (i = 0; i < nlabels; i++) {
            if (i) {
                ngx_http_sbx_out_printf(o, ",");
            }

            ngx_http_sbx_out_json_str(o, &labels[2 * i]);
            ngx_http_sbx_out_printf(o, ":");
            ngx_http_sbx_out_json_str(o, &labels[2 * i + 1]);
        }

        ngx_http_sbx_out_printf(o, "},\"value\":%*s}", len, value);

    } else {
        ngx_http_sbx_out_printf(o, "%V%s", name, suffix);

        for (i = 0; i < nlabels; i++) {
            ngx_http_sbx_out_printf(o, "%s%V=\"", i ? "," : "{",
                                    &labels[2 * i]);
            ngx_http_sbx_out_label(o, &labels[2 * i + 1]);
            ngx_http_sbx_out_printf(o, "\"");
        }

        ngx_http_sbx_out_printf(o, "%s %*s\n", nlabels ? "}" : "",
                                len, value);
    }

    o->nsamples++;
}


static void
ngx_http_sbx_sample_n(ngx_http_sbx_out_t *o, ngx_str_t *name,
    const char *suffix, ngx_str_t *labels, ngx_uint_t nlabels,
    ngx_atomic_uint_t n)
{
    u_char  *p, value[NGX_ATOMIC_T_LEN];

    p = ngx_sprintf(value, "%uA", n);

    ngx_http_sbx_sample(o, name, suffix, labels, nlabels, value, p - value);
}


static void
ngx_http_sbx_render_requests(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_str_t                     labels[4];
    ngx_uint_t                    i, d;
    ngx_http_sbx_connector_t    **cp;
    ngx_http_sbx_metrics_conn_t  *mc;

    cp = mmcf->smcf->connectors.elts;

    ngx_str_set(&labels[0], "connector");
    ngx_str_set(&labels[2], "decision");

    for (i = 0; i < mmcf->smcf->connectors.nelts; i++) {
        if (cp[i]->seq >= mmcf->nconns || mmcf->conns[cp[i]->seq] == NULL) {
            continue;
        }

        mc = mmcf->conns[cp[i]->seq];
        labels[1] = cp[i]->name;

        for (d = 0; d < NGX_HTTP_SBX_NDECISIONS; d++) {
            labels[3] = ngx_http_sbx_decision_names[d];
            ngx_http_sbx_sample_n(o, name, "", labels, 2, mc->requests[d]);
        }
    }
}


static void
ngx_http_sbx_render_duration(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    u_char                       *p, value[NGX_ATOMIC_T_LEN + 8];
    ngx_str_t                     labels[4];
    ngx_uint_t                    i, b;
    ngx_atomic_uint_t             n, count, sum;
    ngx_http_sbx_connector_t    **cp;
    ngx_http_sbx_metrics_conn_t  *mc;

    cp = mmcf->smcf->connectors.elts;

    ngx_str_set(&labels[0], "connector");
    ngx_str_set(&labels[2], "le");

    for (i = 0; i < mmcf->smcf->connectors.nelts; i++) {
        if (cp[i]->seq >= mmcf->nconns || mmcf->conns[cp[i]->seq] == NULL) {
            continue;
        }

        mc = mmcf->conns[cp[i]->seq];
        labels[1] = cp[i]->name;

        /* read once: count is at least the sum of the buckets */

        sum = mc->sum_ms;
        count = mc->count;
        n = 0;

        for (b = 0; b < NGX_HTTP_SBX_NBUCKETS; b++) {
            n += mc->buckets[b];
            labels[3] = ngx_http_sbx_bucket_le[b];
            ngx_http_sbx_sample_n(o, name, "_bucket", labels, 2,
                                  ngx_min(n, count));
        }

        ngx_str_set(&labels[3], "+Inf");
        ngx_http_sbx_sample_n(o, name, "_bucket", labels, 2, count);

        p = ngx_sprintf(value, "%uA.%03uA", sum / 1000, sum % 1000);
        ngx_http_sbx_sample(o, name, "_sum", labels, 1, value, p - value);

        ngx_http_sbx_sample_n(o, name, "_count", labels, 1, count);
    }
}


static ngx_atomic_uint_t
ngx_http_sbx_pool_gauge(ngx_http_sbx_metrics_pool_t *mp, ngx_uint_t queued)
{
    ngx_uint_t                    i;
    ngx_atomic_uint_t             n;
    ngx_http_sbx_metrics_slot_t  *slot;

    n = 0;

    for (i = 0; i < NGX_HTTP_SBX_METRICS_WORKERS; i++) {
        slot = &mp->slots[i];

        if (slot->pid == 0
            || (kill((ngx_pid_t) slot->pid, 0) == -1 && errno == ESRCH))
        {
            continue;
        }

        n += queued ? slot->queued : slot->helpers;
    }

    return n;
}


static void
ngx_http_sbx_render_pools(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name,
    ngx_uint_t queued)
{
    ngx_str_t                     labels[2];
    ngx_uint_t                    i;
    ngx_http_sbx_pool_t         **pp;
    ngx_http_sbx_metrics_pool_t  *mp;

    pp = mmcf->smcf->pools.elts;

    ngx_str_set(&labels[0], "pool");

    for (i = 0; i < mmcf->smcf->pools.nelts; i++) {
        mp = ngx_http_sbx_metrics_pool_get(mmcf, pp[i]);
        if (mp == NULL) {
            continue;
        }

        labels[1] = pp[i]->name;
        ngx_http_sbx_sample_n(o, name, "", labels, 1,
                              ngx_http_sbx_pool_gauge(mp, queued));
    }
}


static void
ngx_http_sbx_render_helpers(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_http_sbx_render_pools(o, mmcf, name, 0);
}


static void
ngx_http_sbx_render_queue(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_http_sbx_render_pools(o, mmcf, name, 1);
}


static void
ngx_http_sbx_render_restarts(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_str_t                     labels[4];
    ngx_uint_t                    i, k;
    ngx_http_sbx_pool_t         **pp;
    ngx_http_sbx_metrics_pool_t  *mp;

    pp = mmcf->smcf->pools.elts;

    ngx_str_set(&labels[0], "pool");
    ngx_str_set(&labels[2], "reason");

    for (i = 0; i < mmcf->smcf->pools.nelts; i++) {
        mp = ngx_http_sbx_metrics_pool_get(mmcf, pp[i]);
        if (mp == NULL) {
            continue;
        }

        labels[1] = pp[i]->name;

        for (k = 0; k < NGX_HTTP_SBX_NRESTART_REASONS; k++) {
            labels[3] = ngx_http_sbx_restart_reasons[k];
            ngx_http_sbx_sample_n(o, name, "", labels, 2, mp->restarts[k]);
        }
    }
}


static void
ngx_http_sbx_render_redis_errors(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_http_sbx_sample_n(o, name, "", NULL, 0, mmcf->sh->redis_errors);
}


static void
ngx_http_sbx_render_fallbacks(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_http_sbx_sample_n(o, name, "", NULL, 0, mmcf->sh->fallbacks);
}


static void
ngx_http_sbx_render_dry_runs(ngx_http_sbx_out_t *o,
    ngx_http_sbx_metrics_main_conf_t *mmcf, ngx_str_t *name)
{
    ngx_str_t   labels[2];
    ngx_uint_t  k;

    ngx_str_set(&labels[0], "check");

    for (k = 0; k < NGX_HTTP_SBX_NDRY_RUN_CHECKS; k++) {
        labels[1] = ngx_http_sbx_dry_run_checks[k];
        ngx_http_sbx_sample_n(o, name, "", labels, 1, mmcf->sh->dry_runs[k]);
    }
}


static ngx_int_t
ngx_http_sbx_status_handler(ngx_http_request_t *r)
{
    ngx_int_t                          rc;
    ngx_str_t                          format, type;
    ngx_http_sbx_out_t                 o;
    ngx_http_sbx_metric_t             *m;
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    mmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_metrics_module);

    if (mmcf->sh == NULL) {
        return NGX_HTTP_SERVICE_UNAVAILABLE;
    }

    ngx_memzero(&o, sizeof(ngx_http_sbx_out_t));
    o.request = r;
    o.last = &o.out;
    o.rc = NGX_OK;

    if (ngx_http_arg(r, (u_char *) "format", 6, &format) == NGX_OK
        && format.len == 4 && ngx_strncmp(format.data, "json", 4) == 0)
    {
        o.json = 1;
    }

    if (o.json) {
        ngx_http_sbx_out_printf(&o, "{");
    }

    for (m = ngx_http_sbx_metrics; m->name.len; m++) {
        o.nsamples = 0;

        if (o.json) {
            ngx_http_sbx_out_printf(&o, "%s\"%V\":{\"type\":\"%V\","
                                    "\"help\":",
                                    m == ngx_http_sbx_metrics ? "" : ",",
                                    &m->name, &m->type);
            ngx_http_sbx_out_json_str(&o, &m->help);
            ngx_http_sbx_out_printf(&o, ",\"samples\":[");

        } else {
            ngx_http_sbx_out_printf(&o, "# HELP %V %V\n# TYPE %V %V\n",
                                    &m->name, &m->help, &m->name, &m->type);
        }

        m->render(&o, mmcf, &m->name);

        if (o.json) {
            ngx_http_sbx_out_printf(&o, "]}");
        }
    }

    if (o.json) {
        ngx_http_sbx_out_printf(&o, "}\n");
        ngx_str_set(&type, "application/json");

    } else {
        ngx_str_set(&type, "text/plain; version=0.0.4");
    }

    return ngx_http_sbx_send(r, &o, &type);
}


static ngx_int_t
ngx_http_sbx_catalog_handler(ngx_http_request_t *r)
{
    u_char                             *p, date[sizeof("Mon, 28 Sep 1970 "
                                                       "06:00:00 GMT")];
    ngx_int_t                           rc;
    ngx_str_t                           type, *s, sunset, since;
    ngx_uint_t                          i, k, d, state;
    ngx_atomic_uint_t                   total;
    ngx_http_sbx_out_t                  o;
    ngx_http_sbx_connector_t           *c, **cp;
    ngx_http_sbx_metrics_conn_t        *mc;
    ngx_http_sbx_metrics_main_conf_t   *mmcf;

    if (!(r->method & (NGX_HTTP_GET|NGX_HTTP_HEAD))) {
        return NGX_HTTP_NOT_ALLOWED;
    }

    rc = ngx_http_discard_request_body(r);
    if (rc != NGX_OK) {
        return rc;
    }

    mmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_metrics_module);

    ngx_memzero(&o, sizeof(ngx_http_sbx_out_t));
    o.request = r;
    o.last = &o.out;
    o.rc = NGX_OK;

    ngx_http_sbx_out_printf(&o, "{\"connectors\":[");

    cp = mmcf->smcf->connectors.elts;

    for (i = 0; i < mmcf->smcf->connectors.nelts; i++) {
        c = cp[i];

        ngx_http_sbx_out_printf(&o, "%s{\"name\":", i ? "," : "");
        ngx_http_sbx_out_json_str(&o, &c->name);

#define ngx_http_sbx_out_opt(key, v)                                          \
        ngx_http_sbx_out_printf(&o, ",\"" key "\":");                         \
        if ((v)->len) {                                                       \
            ngx_http_sbx_out_json_str(&o, v);                                 \
        } else {                                                              \
            ngx_http_sbx_out_printf(&o, "null");                              \
        }

        ngx_http_sbx_out_opt("version", &c->version);
        ngx_http_sbx_out_opt("owner", &c->owner);
        ngx_http_sbx_out_opt("description", &c->description);

        state = c->state <= NGX_HTTP_SBX_STATE_RETIRED ? c->state
                                                       : NGX_HTTP_SBX_STATE_GA;
        ngx_http_sbx_out_printf(&o, ",\"state\":\"%V\"",
                                &ngx_http_sbx_state_names[state]);

        ngx_str_null(&since);

        if (state == NGX_HTTP_SBX_STATE_DEPRECATED) {
            p = ngx_http_time(date, c->deprecated);
            since.data = date;
            since.len = p - date;
        }

        ngx_http_sbx_out_opt("deprecation", &since);

        ngx_str_null(&sunset);

        if (c->sunset != (time_t) NGX_CONF_UNSET) {
            p = ngx_http_time(date, c->sunset);
            sunset.data = date;
            sunset.len = p - date;
        }

        ngx_http_sbx_out_opt("sunset", &sunset);

        ngx_http_sbx_out_printf(&o, ",\"capabilities\":[");

        if (c->cap_names) {
            s = c->cap_names->elts;

            for (k = 0; k < c->cap_names->nelts; k++) {
                if (k) {
                    ngx_http_sbx_out_printf(&o, ",");
                }

                ngx_http_sbx_out_json_str(&o, &s[k]);
            }
        }

        ngx_http_sbx_out_printf(&o, "],\"limits\":{\"memory\":%uz,"
                                "\"instructions\":%ui,\"timeout_ms\":%M}",
                                c->memory, c->instructions, c->timeout);

        if (c->pool) {
            ngx_http_sbx_out_opt("pool", &c->pool->name);

        } else {
            ngx_http_sbx_out_opt("pool", &c->pool_name);
        }

        ngx_http_sbx_out_opt("sha256", &c->digest_hex);

        ngx_http_sbx_out_printf(&o, ",\"pinned\":%s,\"routes\":[",
                                c->pinned.len ? "true" : "false");

        if (c->routes.elts) {
            s = c->routes.elts;

            for (k = 0; k < c->routes.nelts; k++) {
                if (k) {
                    ngx_http_sbx_out_printf(&o, ",");
                }

                ngx_http_sbx_out_json_str(&o, &s[k]);
            }
        }

#undef ngx_http_sbx_out_opt

        mc = (mmcf->sh && c->seq < mmcf->nconns) ? mmcf->conns[c->seq] : NULL;

        total = 0;

        if (mc) {
            for (d = 0; d < NGX_HTTP_SBX_NDECISIONS; d++) {
                total += mc->requests[d];
            }
        }

        ngx_http_sbx_out_printf(&o, "],\"counters\":{\"requests\":%uA,"
                                "\"allowed\":%uA,\"denials\":{",
                                total,
                                mc ? mc->requests[NGX_HTTP_SBX_ALLOWED] : 0);

        for (d = NGX_HTTP_SBX_ALLOWED + 1; d < NGX_HTTP_SBX_NDECISIONS; d++) {
            ngx_http_sbx_out_printf(&o, "%s\"%V\":%uA",
                                    d == NGX_HTTP_SBX_ALLOWED + 1 ? "" : ",",
                                    &ngx_http_sbx_decision_names[d],
                                    mc ? mc->requests[d] : 0);
        }

        ngx_http_sbx_out_printf(&o, "}}}");
    }

    ngx_http_sbx_out_printf(&o, "]}\n");

    ngx_str_set(&type, "application/json");

    return ngx_http_sbx_send(r, &o, &type);
}


static ngx_int_t
ngx_http_sbx_send(ngx_http_request_t *r, ngx_http_sbx_out_t *o,
    ngx_str_t *type)
{
    off_t         len;
    ngx_int_t     rc;
    ngx_chain_t  *cl;

    if (o->rc != NGX_OK || o->out == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    len = 0;

    for (cl = o->out; cl; cl = cl->next) {
        len += cl->buf->last - cl->buf->pos;
        cl->buf->memory = 1;

        if (cl->next == NULL) {
            cl->buf->last_buf = (r == r->main) ? 1 : 0;
            cl->buf->last_in_chain = 1;
        }
    }

    r->headers_out.status = NGX_HTTP_OK;
    r->headers_out.content_length_n = len;
    r->headers_out.content_type = *type;
    r->headers_out.content_type_len = type->len;
    r->headers_out.content_type_lowcase = NULL;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    return ngx_http_output_filter(r, o->out);
}


/* configuration */

static void *
ngx_http_sbx_metrics_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_metrics_main_conf_t  *mmcf;

    mmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_metrics_main_conf_t));
    if (mmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     mmcf->sh = NULL;
     *     mmcf->conns = NULL;
     *     mmcf->pools = NULL;
     */

    return mmcf;
}


static void *
ngx_http_sbx_metrics_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_metrics_loc_conf_t  *mlcf;

    mlcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_metrics_loc_conf_t));
    if (mlcf == NULL) {
        return NULL;
    }

    mlcf->handler = NGX_CONF_UNSET_UINT;

    return mlcf;
}


static char *
ngx_http_sbx_metrics_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_sbx_metrics_loc_conf_t  *prev = parent;
    ngx_http_sbx_metrics_loc_conf_t  *conf = child;

    /* not inherited: a location answers only if it says so */

    (void) prev;

    ngx_conf_init_uint_value(conf->handler, 0);

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_status(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_metrics_loc_conf_t *mlcf = conf;

    ngx_http_core_loc_conf_t  *clcf;

    if (mlcf->handler != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    mlcf->handler = (ngx_uint_t) cmd->post;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    clcf->handler = (mlcf->handler == NGX_HTTP_SBX_HANDLER_STATUS)
                    ? ngx_http_sbx_status_handler
                    : ngx_http_sbx_catalog_handler;

    return NGX_CONF_OK;
}


/*
 * The zone's records are found or added by name, so a connector or pool
 * keeps its counters across reloads whatever its position in the new
 * configuration; this runs in the master once the configuration is read.
 */

static ngx_int_t
ngx_http_sbx_metrics_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_sbx_metrics_main_conf_t  *omcf = data;

    size_t                              size;
    ngx_uint_t                          i;
    ngx_slab_pool_t                    *shpool;
    ngx_http_sbx_pool_t               **pp;
    ngx_http_sbx_connector_t          **cp;
    ngx_http_sbx_metrics_conn_t        *mc;
    ngx_http_sbx_metrics_pool_t        *mp;
    ngx_http_sbx_metrics_main_conf_t   *mmcf;

    mmcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    if (omcf) {
        mmcf->sh = omcf->sh;

    } else if (shm_zone->shm.exists) {
        mmcf->sh = shpool->data;

    } else {
        mmcf->sh = ngx_slab_calloc(shpool,
                                   sizeof(ngx_http_sbx_metrics_shctx_t));
        if (mmcf->sh == NULL) {
            return NGX_ERROR;
        }

        shpool->data = mmcf->sh;
        shpool->log_ctx = (u_char *) " in sbx_metrics zone";
    }

    mmcf->shpool = shpool;

    ngx_shmtx_lock(&shpool->mutex);

    cp = mmcf->smcf->connectors.elts;

    for (i = 0; i < mmcf->smcf->connectors.nelts; i++) {

        for (mc = mmcf->sh->conns; mc; mc = mc->next) {
            if (mc->len == cp[i]->name.len
                && ngx_strncmp(mc->name, cp[i]->name.data, mc->len) == 0)
            {
                break;
            }
        }

        if (mc == NULL) {
            size = sizeof(ngx_http_sbx_metrics_conn_t) + cp[i]->name.len;

            mc = ngx_slab_calloc_locked(shpool, size);
            if (mc == NULL) {
                continue;
            }

            mc->len = cp[i]->name.len;
            ngx_memcpy(mc->name, cp[i]->name.data, mc->len);
            mc->next = mmcf->sh->conns;
            mmcf->sh->conns = mc;
        }

        mmcf->conns[cp[i]->seq] = mc;
    }

    pp = mmcf->smcf->pools.elts;

    for (i = 0; i < mmcf->smcf->pools.nelts; i++) {

        for (mp = mmcf->sh->pools; mp; mp = mp->next) {
            if (mp->len == pp[i]->name.len
                && ngx_strncmp(mp->name, pp[i]->name.data, mp->len) == 0)
            {
                break;
            }
        }

        if (mp == NULL) {
            size = sizeof(ngx_http_sbx_metrics_pool_t) + pp[i]->name.len;

            mp = ngx_slab_calloc_locked(shpool, size);
            if (mp == NULL) {
                continue;
            }

            mp->len = pp[i]->name.len;
            ngx_memcpy(mp->name, pp[i]->name.data, mp->len);
            mp->next = mmcf->sh->pools;
            mmcf->sh->pools = mp;
        }

        mmcf->pools[pp[i]->index] = mp;
    }

    ngx_shmtx_unlock(&shpool->mutex);

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_metrics_init(ngx_conf_t *cf)
{
    ngx_uint_t                          i;
    ngx_http_handler_pt                *h;
    ngx_http_sbx_pool_t               **pp;
    ngx_http_sbx_connector_t          **cp;
    ngx_http_core_main_conf_t          *cmcf;
    ngx_http_sbx_main_conf_t           *smcf;
    ngx_http_sbx_metrics_main_conf_t   *mmcf;

    mmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_sbx_metrics_module);
    smcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_sbx_module);

    mmcf->smcf = smcf;

    /* index space: connector->seq and pool->index */

    cp = smcf->connectors.elts;

    for (i = 0; i < smcf->connectors.nelts; i++) {
        mmcf->nconns = ngx_max(mmcf->nconns, cp[i]->seq + 1);
    }

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        mmcf->npools = ngx_max(mmcf->npools, pp[i]->index + 1);
    }

    mmcf->conns = ngx_pcalloc(cf->pool, (mmcf->nconns + 1)
                              * sizeof(ngx_http_sbx_metrics_conn_t *));
    mmcf->pools = ngx_pcalloc(cf->pool, (mmcf->npools + 1)
                              * sizeof(ngx_http_sbx_metrics_pool_t *));
    mmcf->slot = ngx_palloc(cf->pool, (mmcf->npools + 1) * sizeof(ngx_uint_t));

    if (mmcf->conns == NULL || mmcf->pools == NULL || mmcf->slot == NULL) {
        return NGX_ERROR;
    }

    for (i = 0; i <= mmcf->npools; i++) {
        mmcf->slot[i] = NGX_HTTP_SBX_METRICS_WORKERS;
    }

    mmcf->shm_zone = ngx_shared_memory_add(cf, &ngx_http_sbx_metrics_zone_name,
                                           NGX_HTTP_SBX_METRICS_ZONE_SIZE,
                                           &ngx_http_sbx_metrics_module);
    if (mmcf->shm_zone == NULL) {
        return NGX_ERROR;
    }

    mmcf->shm_zone->init = ngx_http_sbx_metrics_init_zone;
    mmcf->shm_zone->data = mmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_metrics_log_handler;

    return NGX_OK;
}




static void
ngx_http_sbx_metrics_exit_process(ngx_cycle_t *cycle)
{
    ngx_uint_t                          i, k;
    ngx_http_sbx_metrics_pool_t        *mp;
    ngx_http_sbx_metrics_main_conf_t   *mmcf;

    mmcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_sbx_metrics_module);
    if (mmcf == NULL || mmcf->sh == NULL) {
        return;
    }

    /* this worker's helpers are gone with it */

    mmcf->exiting = 1;

    for (i = 0; i < mmcf->npools; i++) {
        mp = mmcf->pools[i];
        if (mp == NULL) {
            continue;
        }

        for (k = 0; k < NGX_HTTP_SBX_METRICS_WORKERS; k++) {
            if (mp->slots[k].pid == (ngx_atomic_uint_t) ngx_pid) {
                mp->slots[k].helpers = 0;
                mp->slots[k].queued = 0;
                mp->slots[k].pid = 0;
            }
        }
    }
}
