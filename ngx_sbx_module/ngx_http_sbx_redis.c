/*
 * ngx_http_sbx_redis.c: hiredis's async API on nginx's event loop, and the
 * per-worker Redis link of the rate limiter (see ngx_http_sbx_redis.h for
 * who owns the file descriptor).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"
#include "ngx_http_sbx_redis.h"


#define NGX_HTTP_SBX_REDIS_FAILURES      5     /* consecutive, to open */
#define NGX_HTTP_SBX_REDIS_COOLDOWN      250   /* ms, first open period */
#define NGX_HTTP_SBX_REDIS_COOLDOWN_MAX  2000
#define NGX_HTTP_SBX_REDIS_BACKOFF       100   /* ms, first reconnect */
#define NGX_HTTP_SBX_REDIS_BACKOFF_MAX   2000
#define NGX_HTTP_SBX_REDIS_MAX_PENDING   4096


typedef struct {
    redisAsyncContext            *context;
    ngx_connection_t             *connection;   /* borrowed for the fd */
} ngx_http_sbx_redis_events_t;


static void ngx_http_sbx_redis_read_handler(ngx_event_t *ev);
static void ngx_http_sbx_redis_write_handler(ngx_event_t *ev);
static void ngx_http_sbx_redis_add_read(void *data);
static void ngx_http_sbx_redis_del_read(void *data);
static void ngx_http_sbx_redis_add_write(void *data);
static void ngx_http_sbx_redis_del_write(void *data);
static void ngx_http_sbx_redis_cleanup(void *data);

static void ngx_http_sbx_redis_connect(ngx_http_sbx_redis_link_t *link);
static void ngx_http_sbx_redis_schedule(ngx_http_sbx_redis_link_t *link);
static void ngx_http_sbx_redis_reconnect_handler(ngx_event_t *ev);
static void ngx_http_sbx_redis_connect_timeout(ngx_event_t *ev);
static void ngx_http_sbx_redis_on_connect(const redisAsyncContext *ac,
    int status);
static void ngx_http_sbx_redis_on_disconnect(const redisAsyncContext *ac,
    int status);
static void ngx_http_sbx_redis_setup_reply(redisAsyncContext *ac,
    void *reply, void *data);


/* the adapter */

static void
ngx_http_sbx_redis_read_handler(ngx_event_t *ev)
{
    ngx_connection_t             *c;
    ngx_http_sbx_redis_events_t  *e;

    c = ev->data;
    e = c->data;

    /* may free the context, and with it c and e */
    redisAsyncHandleRead(e->context);
}


static void
ngx_http_sbx_redis_write_handler(ngx_event_t *ev)
{
    ngx_connection_t             *c;
    ngx_http_sbx_redis_events_t  *e;

    c = ev->data;
    e = c->data;

    redisAsyncHandleWrite(e->context);
}


static void
ngx_http_sbx_redis_add_read(void *data)
{
    ngx_http_sbx_redis_events_t *e = data;

    ngx_event_t  *ev;

    ev = e->connection->read;

    if (!ev->active) {
        if (ngx_add_event(ev, NGX_READ_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0,
                          "sbx redis: ngx_add_event() failed");
        }
    }
}


static void
ngx_http_sbx_redis_del_read(void *data)
{
    ngx_http_sbx_redis_events_t *e = data;

    ngx_event_t  *ev;

    ev = e->connection->read;

    if (ev->active) {
        ngx_del_event(ev, NGX_READ_EVENT, 0);
    }
}


static void
ngx_http_sbx_redis_add_write(void *data)
{
    ngx_http_sbx_redis_events_t *e = data;

    ngx_event_t  *ev;

    ev = e->connection->write;

    if (!ev->active) {
        if (ngx_add_event(ev, NGX_WRITE_EVENT, NGX_LEVEL_EVENT) != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, ev->log, 0,
                          "sbx redis: ngx_add_event() failed");
        }
    }
}


static void
ngx_http_sbx_redis_del_write(void *data)
{
    ngx_http_sbx_redis_events_t *e = data;

    ngx_event_t  *ev;

    ev = e->connection->write;

    if (ev->active) {
        ngx_del_event(ev, NGX_WRITE_EVENT, 0);
    }
}


/*
 * hiredis calls this from redisAsyncFree() before it closes the fd: remove
 * the events while the fd is still open, and give the connection back
 * without closing anything.
 */

static void
ngx_http_sbx_redis_cleanup(void *data)
{
    ngx_http_sbx_redis_events_t *e = data;

    ngx_connection_t  *c;

    c = e->connection;

    ngx_http_sbx_redis_del_read(e);
    ngx_http_sbx_redis_del_write(e);

    if (c->read->posted) {
        ngx_delete_posted_event(c->read);
    }

    if (c->write->posted) {
        ngx_delete_posted_event(c->write);
    }

    ngx_free_connection(c);
    c->fd = (ngx_socket_t) -1;

    ngx_free(e);
}


ngx_int_t
ngx_http_sbx_redis_attach(redisAsyncContext *ac, ngx_log_t *log)
{
    ngx_connection_t             *c;
    ngx_http_sbx_redis_events_t  *e;

    /* nothing may be attached twice */
    if (ac->ev.data != NULL) {
        return NGX_ERROR;
    }

    e = ngx_alloc(sizeof(ngx_http_sbx_redis_events_t), log);
    if (e == NULL) {
        return NGX_ERROR;
    }

    c = ngx_get_connection(ac->c.fd, log);
    if (c == NULL) {
        ngx_free(e);
        return NGX_ERROR;
    }

    c->data = e;
    c->log = log;
    c->read->log = log;
    c->write->log = log;
    c->read->handler = ngx_http_sbx_redis_read_handler;
    c->write->handler = ngx_http_sbx_redis_write_handler;

    e->context = ac;
    e->connection = c;

    ac->ev.addRead = ngx_http_sbx_redis_add_read;
    ac->ev.delRead = ngx_http_sbx_redis_del_read;
    ac->ev.addWrite = ngx_http_sbx_redis_add_write;
    ac->ev.delWrite = ngx_http_sbx_redis_del_write;
    ac->ev.cleanup = ngx_http_sbx_redis_cleanup;
    ac->ev.data = e;

    /* writable: the non-blocking connect finished (or failed) */
    ngx_http_sbx_redis_add_read(e);
    ngx_http_sbx_redis_add_write(e);

    return NGX_OK;
}


/* the link */

ngx_int_t
ngx_http_sbx_redis_link_init(ngx_http_sbx_redis_link_t *link,
    ngx_http_sbx_redis_conf_t *conf, ngx_str_t *script, ngx_log_t *log)
{
    link->conf = conf;
    link->log = log;
    link->script = *script;
    link->cooldown = NGX_HTTP_SBX_REDIS_COOLDOWN;

    link->connect_ev.handler = ngx_http_sbx_redis_connect_timeout;
    link->connect_ev.data = link;
    link->connect_ev.log = log;
    link->connect_ev.cancelable = 1;

    link->reconnect_ev.handler = ngx_http_sbx_redis_reconnect_handler;
    link->reconnect_ev.data = link;
    link->reconnect_ev.log = log;
    link->reconnect_ev.cancelable = 1;

    ngx_http_sbx_redis_connect(link);

    return NGX_OK;
}


void
ngx_http_sbx_redis_link_close(ngx_http_sbx_redis_link_t *link)
{
    redisAsyncContext  *ac;

    link->exiting = 1;

    if (link->connect_ev.timer_set) {
        ngx_del_timer(&link->connect_ev);
    }

    if (link->reconnect_ev.timer_set) {
        ngx_del_timer(&link->reconnect_ev);
    }

    ac = link->ac;

    if (ac) {
        link->ac = NULL;
        link->connected = 0;
        redisAsyncFree(ac);
    }
}


static void
ngx_http_sbx_redis_connect(ngx_http_sbx_redis_link_t *link)
{
    int                         argc;
    size_t                      argvlen[3];
    u_char                      db[NGX_INT_T_LEN];
    const char                 *argv[3];
    redisAsyncContext          *ac;
    ngx_http_sbx_redis_conf_t  *conf;

    conf = link->conf;

    if (conf->unix_path.len) {
        ac = redisAsyncConnectUnix((const char *) conf->unix_path.data);

    } else {
        ac = redisAsyncConnect((const char *) conf->host.data, conf->port);
    }

    if (ac == NULL) {
        ngx_log_error(NGX_LOG_ERR, link->log, 0,
                      "sbx redis: redisAsyncConnect(\"%V\") failed",
                      &conf->addr);
        ngx_http_sbx_redis_schedule(link);
        return;
    }

    if (ac->err) {
        ngx_log_error(NGX_LOG_ERR, link->log, 0,
                      "sbx redis: connect to \"%V\" failed: %s",
                      &conf->addr, ac->errstr);
        redisAsyncFree(ac);
        ngx_http_sbx_metrics_redis_error();
        ngx_http_sbx_redis_schedule(link);
        return;
    }

    if (ngx_http_sbx_redis_attach(ac, link->log) != NGX_OK) {
        ngx_log_error(NGX_LOG_ERR, link->log, 0,
                      "sbx redis: no free connection for \"%V\"",
                      &conf->addr);
        redisAsyncFree(ac);
        ngx_http_sbx_redis_schedule(link);
        return;
    }

    ac->data = link;
    redisAsyncSetConnectCallback(ac, ngx_http_sbx_redis_on_connect);
    redisAsyncSetDisconnectCallback(ac, ngx_http_sbx_redis_on_disconnect);

    link->ac = ac;
    link->connected = 0;

    ngx_add_timer(&link->connect_ev, conf->connect_timeout);

    /* queued now, written once connected, ahead of any request */

    if (conf->password.len) {
        argv[0] = "AUTH";
        argvlen[0] = 4;
        argv[1] = (const char *) conf->password.data;
        argvlen[1] = conf->password.len;
        (void) redisAsyncCommandArgv(ac, ngx_http_sbx_redis_setup_reply,
                                     "AUTH", 2, argv, argvlen);
    }

    if (conf->db > 0) {
        argv[0] = "SELECT";
        argvlen[0] = 6;
        argv[1] = (const char *) db;
        argvlen[1] = ngx_sprintf(db, "%i", conf->db) - db;
        (void) redisAsyncCommandArgv(ac, ngx_http_sbx_redis_setup_reply,
                                     "SELECT", 2, argv, argvlen);
    }

    if (link->script.len) {
        argc = 3;
        argv[0] = "SCRIPT";
        argvlen[0] = 6;
        argv[1] = "LOAD";
        argvlen[1] = 4;
        argv[2] = (const char *) link->script.data;
        argvlen[2] = link->script.len;
        (void) redisAsyncCommandArgv(ac, ngx_http_sbx_redis_setup_reply,
                                     "SCRIPT LOAD", argc, argv, argvlen);
    }
}


static void
ngx_http_sbx_redis_schedule(ngx_http_sbx_redis_link_t *link)
{
    if (link->exiting || link->reconnect_ev.timer_set) {
        return;
    }

    if (link->backoff == 0) {
        link->backoff = NGX_HTTP_SBX_REDIS_BACKOFF;

    } else {
        link->backoff = ngx_min(link->backoff * 2,
                                NGX_HTTP_SBX_REDIS_BACKOFF_MAX);
    }

    ngx_add_timer(&link->reconnect_ev, link->backoff);
}


static void
ngx_http_sbx_redis_reconnect_handler(ngx_event_t *ev)
{
    ngx_http_sbx_redis_link_t  *link;

    link = ev->data;

    if (link->ac == NULL && !link->exiting) {
        ngx_http_sbx_redis_connect(link);
    }
}


static void
ngx_http_sbx_redis_connect_timeout(ngx_event_t *ev)
{
    redisAsyncContext          *ac;
    ngx_http_sbx_redis_link_t  *link;

    link = ev->data;
    ac = link->ac;

    if (ac == NULL || link->connected) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, link->log, 0,
                  "sbx redis: connect to \"%V\" timed out",
                  &link->conf->addr);

    link->ac = NULL;

    /* not connected: hiredis calls no disconnect callback */
    redisAsyncFree(ac);

    ngx_http_sbx_metrics_redis_error();
    ngx_http_sbx_redis_schedule(link);
}


static void
ngx_http_sbx_redis_on_connect(const redisAsyncContext *ac, int status)
{
    ngx_http_sbx_redis_link_t  *link;

    link = ac->data;

    if (link->connect_ev.timer_set) {
        ngx_del_timer(&link->connect_ev);
    }

    if (status != REDIS_OK) {
        ngx_log_error(NGX_LOG_ERR, link->log, 0,
                      "sbx redis: connect to \"%V\" failed: %s",
                      &link->conf->addr, ac->errstr);

        /* hiredis frees the context when this returns */
        if (link->ac == ac) {
            link->ac = NULL;
        }

        ngx_http_sbx_metrics_redis_error();
        ngx_http_sbx_redis_schedule(link);
        return;
    }

    ngx_log_error(NGX_LOG_INFO, link->log, 0,
                  "sbx redis: connected to \"%V\"", &link->conf->addr);

    link->connected = 1;
    link->backoff = 0;
}


static void
ngx_http_sbx_redis_on_disconnect(const redisAsyncContext *ac, int status)
{
    ngx_http_sbx_redis_link_t  *link;

    link = ac->data;

    if (link->ac == ac) {
        link->ac = NULL;
        link->connected = 0;
    }

    if (link->exiting) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, link->log, 0,
                  "sbx redis: connection to \"%V\" lost%s%s",
                  &link->conf->addr, ac->err ? ": " : "",
                  ac->err ? ac->errstr : "");

    ngx_http_sbx_metrics_redis_error();
    ngx_http_sbx_redis_schedule(link);
}


static void
ngx_http_sbx_redis_setup_reply(redisAsyncContext *ac, void *reply,
    void *data)
{
    redisReply                 *rr;
    ngx_http_sbx_redis_link_t  *link;

    rr = reply;
    link = ac->data;

    if (rr == NULL || rr->type != REDIS_REPLY_ERROR) {
        return;
    }

    ngx_log_error(NGX_LOG_ERR, link->log, 0,
                  "sbx redis: %s on \"%V\" failed: %*s",
                  (char *) data, &link->conf->addr,
                  (size_t) rr->len, rr->str);

    /* a wrong password or db: drop the connection and retry later */
    redisAsyncFree(ac);
}


ngx_int_t
ngx_http_sbx_redis_link_ready(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t *probe)
{
    *probe = 0;

    if (link->ac == NULL
        || link->pending >= NGX_HTTP_SBX_REDIS_MAX_PENDING)
    {
        return NGX_DECLINED;
    }

    switch (link->breaker) {

    case NGX_HTTP_SBX_BREAKER_CLOSED:
        return NGX_OK;

    case NGX_HTTP_SBX_BREAKER_OPEN:
        if ((ngx_msec_int_t) (link->open_until - ngx_current_msec) > 0) {
            return NGX_DECLINED;
        }

        link->breaker = NGX_HTTP_SBX_BREAKER_HALF_OPEN;
        link->probing = 1;
        *probe = 1;
        return NGX_OK;

    default: /* NGX_HTTP_SBX_BREAKER_HALF_OPEN: one trial at a time */
        return NGX_DECLINED;
    }
}


ngx_int_t
ngx_http_sbx_redis_link_send(ngx_http_sbx_redis_link_t *link,
    redisCallbackFn *fn, void *data, int argc, const char **argv,
    const size_t *argvlen)
{
    if (link->ac == NULL) {
        return NGX_DECLINED;
    }

    if (redisAsyncCommandArgv(link->ac, fn, data, argc, argv, argvlen)
        != REDIS_OK)
    {
        return NGX_DECLINED;
    }

    link->pending++;

    return NGX_OK;
}


void
ngx_http_sbx_redis_link_success(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t probe)
{
    if (link->breaker != NGX_HTTP_SBX_BREAKER_CLOSED) {
        ngx_log_error(NGX_LOG_NOTICE, link->log, 0,
                      "sbx redis: \"%V\" answers again, circuit closed",
                      &link->conf->addr);
    }

    link->failures = 0;
    link->breaker = NGX_HTTP_SBX_BREAKER_CLOSED;
    link->probing = 0;
    link->cooldown = NGX_HTTP_SBX_REDIS_COOLDOWN;
}


void
ngx_http_sbx_redis_link_failure(ngx_http_sbx_redis_link_t *link,
    ngx_uint_t probe, const char *what, const char *err)
{
    ngx_http_sbx_metrics_redis_error();

    link->failures++;

    if (link->breaker == NGX_HTTP_SBX_BREAKER_CLOSED) {
        ngx_log_error(NGX_LOG_ERR, link->log, 0,
                      "sbx redis: %s on \"%V\" failed: %s",
                      what, &link->conf->addr, err);
    }

    if (!probe && link->failures < NGX_HTTP_SBX_REDIS_FAILURES) {
        return;
    }

    if (link->breaker == NGX_HTTP_SBX_BREAKER_CLOSED) {
        ngx_log_error(NGX_LOG_WARN, link->log, 0,
                      "sbx redis: %ui failures on \"%V\", circuit open, "
                      "rate limits use the fallback", link->failures,
                      &link->conf->addr);

    } else if (probe) {
        link->cooldown = ngx_min(link->cooldown * 2,
                                 NGX_HTTP_SBX_REDIS_COOLDOWN_MAX);
    }

    if (probe || link->breaker == NGX_HTTP_SBX_BREAKER_CLOSED) {
        link->breaker = NGX_HTTP_SBX_BREAKER_OPEN;
        link->open_until = ngx_current_msec + link->cooldown;
        link->probing = 0;
    }
}
