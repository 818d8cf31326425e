/*
 * ngx_http_sbx_module.h: types shared by the files of ngx_sbx_module.
 *
 * The .so holds several nginx modules, one per concern:
 *   ngx_http_sbx_module            connectors, helper pools, content mode
 *   ngx_http_sbx_ratelimit_module  sbx_rate_limit, sbx_redis (access phase)
 *   ngx_http_sbx_residency_module  sbx_geoip_db, sbx_residency (access phase)
 * They meet in the per-request context below, which the core module owns:
 * every decision is recorded there, and the log phase reads it.
 */

#ifndef _NGX_HTTP_SBX_MODULE_H_INCLUDED_
#define _NGX_HTTP_SBX_MODULE_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "sbx_proto.h"


/* decisions: audit "decision" and sbx_requests_total{decision} */
typedef enum {
    NGX_HTTP_SBX_ALLOWED = 0,
    NGX_HTTP_SBX_RESIDENCY_DENIED,
    NGX_HTTP_SBX_RATE_LIMITED,
    NGX_HTTP_SBX_RETIRED,
    NGX_HTTP_SBX_TRANSFORM_ERROR,
    NGX_HTTP_SBX_TRANSFORM_TIMEOUT,
    NGX_HTTP_SBX_OVERLOADED,
    NGX_HTTP_SBX_SANDBOX_FAILURE,
    NGX_HTTP_SBX_RATELIMIT_UNAVAILABLE,
    NGX_HTTP_SBX_NDECISIONS
} ngx_http_sbx_decision_e;


/* calls a helper may have in flight: sbx_pool pipeline=N */
#define NGX_HTTP_SBX_MAX_PIPELINE      16


typedef struct ngx_http_sbx_pool_s       ngx_http_sbx_pool_t;
typedef struct ngx_http_sbx_connector_s  ngx_http_sbx_connector_t;
typedef struct ngx_http_sbx_helper_s     ngx_http_sbx_helper_t;
typedef struct ngx_http_sbx_call_s       ngx_http_sbx_call_t;


/* one per sbx_pool; per worker state lives in `helpers` and `queue` */
struct ngx_http_sbx_pool_s {
    ngx_str_t                     name;
    ngx_uint_t                    index;
    ngx_uint_t                    size;
    ngx_uint_t                    queue_max;
    ngx_uint_t                    max_requests;
    ngx_uint_t                    pipeline;       /* calls in flight/helper */
    size_t                        memory;         /* helper RLIMIT_AS */
    ngx_array_t                   connectors;     /* connector pointers */

    /* worker-local */
    ngx_http_sbx_helper_t        *helpers;
    ngx_queue_t                   queue;          /* waiting calls */
    ngx_uint_t                    queued;
    ngx_uint_t                    alive;          /* helpers ready or busy */
    u_char                       *init;           /* INIT frame */
    size_t                        init_len;
    ngx_str_t                     helper_path;
    ngx_log_t                    *log;
    ngx_array_t                   zombies;        /* pids not reaped yet */
    ngx_event_t                   reap_ev;
    ngx_uint_t                    deaths;         /* in the current second */
    time_t                        deaths_sec;

    u_char                       *conf_file;
    ngx_uint_t                    conf_line;
};


struct ngx_http_sbx_connector_s {
    ngx_str_t                     name;
    ngx_str_t                     script;         /* path */
    ngx_str_t                     source;
    u_char                        digest[32];
    ngx_str_t                     digest_hex;
    ngx_str_t                     pinned;         /* sha256 directive */
    ngx_str_t                     version;
    ngx_str_t                     owner;
    ngx_str_t                     description;
    ngx_uint_t                    state;
    time_t                        sunset;         /* NGX_CONF_UNSET: none */
    time_t                        deprecated;     /* configuration time */
    uint32_t                      caps;
    ngx_array_t                  *cap_names;      /* ngx_str_t */
    size_t                        memory;
    ngx_uint_t                    instructions;
    ngx_msec_t                    timeout;
    ngx_str_t                     pool_name;
    ngx_http_sbx_pool_t          *pool;
    ngx_uint_t                    index;          /* within its pool */
    ngx_uint_t                    hooks;          /* SBX_HAS_* */
    ngx_uint_t                    seq;            /* declaration order */
    ngx_array_t                   routes;         /* ngx_str_t: locations */

    u_char                       *conf_file;
    ngx_uint_t                    conf_line;
    ngx_uint_t                    script_line;
    ngx_uint_t                    sha256_line;    /* 0: not given */
    ngx_uint_t                    pool_line;
    ngx_uint_t                    limits_line;
};


typedef struct {
    ngx_str_t                     helper_path;
    ngx_flag_t                    require_pinned;
    ngx_array_t                   pools;          /* ngx_http_sbx_pool_t * */
    ngx_array_t                   connectors;     /* connector pointers */
    ngx_int_t                     request_id_index;
} ngx_http_sbx_main_conf_t;


#define NGX_HTTP_SBX_STATE_BETA        0
#define NGX_HTTP_SBX_STATE_GA          1
#define NGX_HTTP_SBX_STATE_DEPRECATED  2
#define NGX_HTTP_SBX_STATE_RETIRED     3


/* a location's "sbx_connector NAME;", resolved in merge */
typedef struct {
    ngx_str_t                     name;
    u_char                       *file;
    ngx_uint_t                    line;
} ngx_http_sbx_ref_t;


typedef struct {
    ngx_http_sbx_connector_t     *connector;
    ngx_http_sbx_ref_t           *ref;
    ngx_flag_t                    content;        /* no other handler */
} ngx_http_sbx_loc_conf_t;


/*
 * Per-request context, shared by all sbx modules.  Fields left unset are
 * written as null in the audit event.
 */
typedef struct {
    ngx_http_sbx_connector_t     *connector;     /* NULL off connector routes */
    ngx_http_sbx_decision_e       decision;
    ngx_flag_t                    decided;        /* a decision was recorded */

    ngx_str_t                     country;        /* "" when unknown */
    ngx_str_t                     continent;
    ngx_flag_t                    geo_done;

    ngx_str_t                     limit;          /* denying limit's name */
    ngx_int_t                     ratelimit_remaining;  /* -1: none */
    ngx_flag_t                    ratelimit_fallback;

    ngx_msec_t                    helper_ms;
    ngx_msec_t                    redis_ms;
    ngx_int_t                     helper_pid;     /* 0: none */

    /* core: the call to the helper */
    ngx_http_sbx_call_t          *call;
    ngx_flag_t                    waiting;
} ngx_http_sbx_ctx_t;


extern ngx_module_t  ngx_http_sbx_module;

extern const ngx_str_t  ngx_http_sbx_decision_names[];


ngx_http_sbx_ctx_t *ngx_http_sbx_get_ctx(ngx_http_request_t *r);

/*
 * Records the decision and answers with the contract's JSON error body
 * {"error":"<code>","request_id":"<id>"}; retry_after > 0 adds Retry-After.
 * From an access-phase handler use it as
 *     ngx_http_finalize_request(r, ngx_http_sbx_send_error(...));
 *     return NGX_DONE;
 */
ngx_int_t ngx_http_sbx_send_error(ngx_http_request_t *r, ngx_uint_t status,
    ngx_http_sbx_decision_e decision, time_t retry_after);

void ngx_http_sbx_set_decision(ngx_http_request_t *r,
    ngx_http_sbx_decision_e decision);

/* NGX_ERROR, logged, if a "key=" of cf->args[from...] is given twice */
ngx_int_t ngx_http_sbx_params_unique(ngx_conf_t *cf, ngx_uint_t from);

/* ngx_conf_set_enum_slot() with an error that names the directive */
char *ngx_http_sbx_conf_set_enum(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

/*
 * Adds the location's RateLimit-Policy to an answer decided before its
 * rate limits were checked (ngx_http_sbx_ratelimit.c); a no-op otherwise.
 */
ngx_int_t ngx_http_sbx_rl_policy_header(ngx_http_request_t *r);

/* $request_id of the main request (stable for the whole request) */
void ngx_http_sbx_request_id(ngx_http_request_t *r, ngx_str_t *id);


/* ngx_http_sbx_script.c */
char *ngx_http_sbx_script_load(ngx_conf_t *cf,
    ngx_http_sbx_main_conf_t *smcf, ngx_http_sbx_connector_t *c);

/* ngx_http_sbx_pool.c */
ngx_int_t ngx_http_sbx_pool_init_process(ngx_cycle_t *cycle,
    ngx_http_sbx_main_conf_t *smcf);
void ngx_http_sbx_pool_exit_process(ngx_cycle_t *cycle,
    ngx_http_sbx_main_conf_t *smcf);

/* a call finished: outcome is SBX_OUT_* or one of the codes below */
#define NGX_HTTP_SBX_CALL_OVERLOADED   100
#define NGX_HTTP_SBX_CALL_DIED         101
#define NGX_HTTP_SBX_CALL_KILLED       102    /* wall-clock kill */
#define NGX_HTTP_SBX_CALL_UNAVAILABLE  103    /* no helper could start */

typedef void (*ngx_http_sbx_call_done_pt)(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);

struct ngx_http_sbx_call_s {
    ngx_http_request_t           *request;
    ngx_http_sbx_connector_t     *connector;
    ngx_http_sbx_call_done_pt     done;
    ngx_uint_t                    hook;           /* SBX_HOOK_* */

    ngx_buf_t                    *out;            /* CALL frame */
    ngx_queue_t                   queue;
    ngx_event_t                   wait_ev;        /* queue wait limit */
    ngx_flag_t                    queued;
    ngx_http_sbx_helper_t        *helper;
    ngx_msec_t                    start;
    uint32_t                      id;

    /* result */
    ngx_uint_t                    outcome;
    u_char                       *result;         /* RESULT payload */
    size_t                        result_len;
    ngx_str_t                     message;
    uint64_t                      instructions;
    uint64_t                      memory_peak;
    uint32_t                      time_us;
    ngx_int_t                     helper_pid;
};

ngx_int_t ngx_http_sbx_call_start(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);
void ngx_http_sbx_call_cancel(ngx_http_sbx_call_t *call);

/* ngx_http_sbx_ipc.c */

/* the upstream's answer handed to a response hook */
typedef struct {
    ngx_uint_t                    status;
    ngx_list_t                   *headers;
    ngx_table_elt_t              *content_type;   /* or NULL */
    ngx_chain_t                  *body;           /* NULL: no body */
} ngx_http_sbx_upstream_answer_t;

/*
 * A call of hook for the request (res: the upstream's answer, response
 * hook only), its CALL frame built, recorded in the request's context;
 * NULL on failure.
 */
ngx_http_sbx_call_t *ngx_http_sbx_call_create(ngx_http_request_t *r,
    ngx_http_sbx_connector_t *c, ngx_uint_t hook,
    ngx_http_sbx_upstream_answer_t *res, ngx_http_sbx_call_done_pt done);
ngx_buf_t *ngx_http_sbx_ipc_request(ngx_http_request_t *r,
    ngx_http_sbx_connector_t *c, ngx_uint_t hook, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_upstream_answer_t *res);
ngx_int_t ngx_http_sbx_ipc_result(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call, sbx_rd_t *rd);
ngx_int_t ngx_http_sbx_ipc_log_lines(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call, sbx_rd_t *rd);
u_char *ngx_http_sbx_ipc_escape(u_char *dst, u_char *last, const u_char *src,
    size_t len);

/*
 * ngx_http_sbx_residency.c: fills ctx->country and ctx->continent from
 * sbx_geoip_db for the client address realip settled on (once per request;
 * empty strings when unknown or no database).  The core calls it before
 * building req.client.
 */
ngx_int_t ngx_http_sbx_geo_lookup(ngx_http_request_t *r,
    ngx_http_sbx_ctx_t *ctx);


/*
 * ngx_http_sbx_metrics.c: counters in shared memory, aggregated across
 * workers (DESIGN.md section 8).  Pools report per-worker gauges and helper
 * restarts; the rate limiter reports Redis errors and fallback decisions;
 * request metrics are taken in the log phase from the context.
 */
#define NGX_HTTP_SBX_RESTART_EXIT      0   /* helper exited by itself */
#define NGX_HTTP_SBX_RESTART_SIGNAL    1   /* killed by a signal */
#define NGX_HTTP_SBX_RESTART_SECCOMP   2   /* SIGSYS: seccomp violation */
#define NGX_HTTP_SBX_RESTART_TIMEOUT   3   /* killed by the worker: timeout */
#define NGX_HTTP_SBX_RESTART_RECYCLE   4   /* max_requests or CPU budget */
#define NGX_HTTP_SBX_RESTART_STARTUP   5   /* failed to start or load */
#define NGX_HTTP_SBX_NRESTART_REASONS  6

void ngx_http_sbx_metrics_pool(ngx_http_sbx_pool_t *pool, ngx_uint_t helpers,
    ngx_uint_t queued);
void ngx_http_sbx_metrics_restart(ngx_http_sbx_pool_t *pool,
    ngx_uint_t reason);
void ngx_http_sbx_metrics_redis_error(void);
void ngx_http_sbx_metrics_fallback(void);

/* sbx_dry_run_denials_total{check}: a dry-run rule would have denied */
#define NGX_HTTP_SBX_DRY_RUN_RESIDENCY  0
#define NGX_HTTP_SBX_DRY_RUN_RATELIMIT  1
#define NGX_HTTP_SBX_NDRY_RUN_CHECKS    2

void ngx_http_sbx_metrics_dry_run(ngx_uint_t check);

/* ngx_http_sbx_content.c */
ngx_int_t ngx_http_sbx_content_handler(ngx_http_request_t *r);

/*
 * Sends the response table a RESULT carries (rd at its status); answers
 * 500 transform_error on anything invalid.  Returns what a content handler
 * returns.
 */
ngx_int_t ngx_http_sbx_content_send(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call, sbx_rd_t *rd);

/*
 * The answer of DESIGN.md section 6 for a call that produced no usable
 * result (the pool's failures, a malformed RESULT, script errors and
 * limits), with the reason in the error log; hook names it there.
 */
ngx_int_t ngx_http_sbx_call_fail(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call, const char *hook);


#endif /* _NGX_HTTP_SBX_MODULE_H_INCLUDED_ */
