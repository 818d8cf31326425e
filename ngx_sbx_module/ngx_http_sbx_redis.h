/*
 * ngx_http_sbx_redis.h: hiredis's async API on nginx's event loop.
 *
 * Two layers:
 *
 *   the adapter (ngx_http_sbx_redis_attach) plugs a redisAsyncContext into
 *   nginx events, in the style of hiredis's adapters/;
 *
 *   the link (ngx_http_sbx_redis_link_t) is one persistent, pipelined
 *   connection per worker: connect with a deadline, AUTH and SELECT,
 *   reconnect with backoff, and a circuit breaker that stops sending after
 *   repeated failures and lets single trial commands through.
 *
 * File descriptor ownership: hiredis opens the socket and hiredis closes
 * it (redisFree).  The adapter borrows it: it takes an ngx_connection_t for
 * the fd with ngx_get_connection() only to get nginx read/write events, and
 * gives it back with ngx_free_connection() in the cleanup hook, which
 * hiredis calls before it closes the fd.  The adapter never closes the fd
 * (no ngx_close_connection()); it removes its events with ngx_del_event()
 * and marks the nginx connection's fd -1 so nginx never sees it as open.
 */

#ifndef _NGX_HTTP_SBX_REDIS_H_INCLUDED_
#define _NGX_HTTP_SBX_REDIS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <hiredis/hiredis.h>
#include <hiredis/async.h>


typedef struct {
    ngx_str_t                     addr;           /* as configured */
    ngx_str_t                     host;           /* numeric, NUL-ended */
    int                           port;
    ngx_str_t                     unix_path;      /* NUL-ended, or empty */
    ngx_str_t                     password;
    ngx_int_t                     db;
    ngx_msec_t                    connect_timeout;
    ngx_msec_t                    timeout;        /* per command */
    ngx_str_t                     prefix;         /* of every key */
} ngx_http_sbx_redis_conf_t;


/* circuit breaker states */
#define NGX_HTTP_SBX_BREAKER_CLOSED     0
#define NGX_HTTP_SBX_BREAKER_OPEN       1
#define NGX_HTTP_SBX_BREAKER_HALF_OPEN  2


typedef struct {
    ngx_http_sbx_redis_conf_t    *conf;
    ngx_log_t                    *log;

    redisAsyncContext            *ac;             /* NULL: disconnected */
    ngx_flag_t                    connected;
    ngx_event_t                   connect_ev;     /* connect deadline */
    ngx_event_t                   reconnect_ev;
    ngx_msec_t                    backoff;

    ngx_uint_t                    breaker;
    ngx_uint_t                    failures;       /* consecutive */
    ngx_msec_t                    open_until;
    ngx_msec_t                    cooldown;
    ngx_flag_t                    probing;        /* a trial in flight */

    ngx_uint_t                    pending;        /* commands in flight */
    ngx_flag_t                    exiting;

    /* sent once per connection before anything else */
    ngx_str_t                     script;
} ngx_http_sbx_redis_link_t;


/* adapter */
ngx_int_t ngx_http_sbx_redis_attach(redisAsyncContext *ac, ngx_log_t *log);

/* link */
ngx_int_t ngx_http_sbx_redis_link_init(ngx_http_sbx_redis_link_t *link,
    ngx_http_sbx_redis_conf_t *conf, ngx_str_t *script, ngx_log_t *log);
void ngx_http_sbx_redis_link_close(ngx_http_sbx_redis_link_t *link);

/*
 * NGX_OK: a command may be sent now (*probe set when it is the breaker's
 * single trial); NGX_DECLINED: use the fallback.
 */
ngx_int_t ngx_http_sbx_redis_link_ready(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t *probe);
ngx_int_t ngx_http_sbx_redis_link_send(ngx_http_sbx_redis_link_t *link,
    redisCallbackFn *fn, void *data, int argc, const char **argv,
    const size_t *argvlen);
void ngx_http_sbx_redis_link_success(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t probe);
void ngx_http_sbx_redis_link_failure(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t probe, const char *what, const char *err);


#endif /* _NGX_HTTP_SBX_REDIS_H_INCLUDED_ */
