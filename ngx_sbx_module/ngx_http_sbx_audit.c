/*
 * ngx_http_sbx_audit.c: the audit log (DESIGN.md section 7).
 *
 *     sbx_audit_log PATH | off [chain=on|off] [anonymize=on|off]
 *                   [headers=NAME,...] [buffer=SIZE [flush=TIME]];
 *
 * One JSON object per line for every request to a connector route, written
 * in the log phase with a single write() on an O_APPEND descriptor, so that
 * the lines of several workers never interleave.  With buffer=, a worker
 * keeps its lines (without "seq" and "prev") and writes them together,
 * still whole and in one write(), when the buffer is full, after flush=
 * (default 1s), on reopen and at exit; "seq" and "prev" are assigned at
 * that moment, under the zone's mutex.  The file is opened with
 * ngx_conf_open_file(): "nginx -s reopen" (USR1) reopens it like
 * access_log.
 *
 * Every line carries "seq", its number in the file (1 for the first line),
 * and with chain=on "prev": the hex SHA-256 of the previous line of the
 * file (its bytes without the newline; null on the first line).  The state
 * of the file (identity, size, last seq and hash) lives in the shared zone
 * "sbx_audit" and is only touched under the zone's mutex, which is also
 * held across the write(): the order of the lines in the file is the order
 * of the chain.  The zone keeps its size, so it survives reload.  When a
 * worker finds that its descriptor is not the file the state describes (a
 * new file after reopen, a restart, a file changed behind our back) it
 * reads the file's last line and continues from it.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <openssl/evp.h>

#include "ngx_http_sbx_module.h"
#include "ngx_http_sbx_metrics.h"


#define NGX_HTTP_SBX_AUDIT_HASH_LEN    32
#define NGX_HTTP_SBX_AUDIT_HEADER_MAX  256      /* bytes of a header value */
#define NGX_HTTP_SBX_AUDIT_TAIL_MAX    (1024 * 1024)


typedef struct {
    ngx_flag_t                    known;
    dev_t                         dev;
    ino_t                         ino;
    off_t                         size;          /* after our last write */
    uint64_t                      seq;           /* of the last line */
    ngx_flag_t                    has_prev;      /* prev holds its hash */
    u_char                        prev[NGX_HTTP_SBX_AUDIT_HASH_LEN];
} ngx_http_sbx_audit_sh_t;


typedef struct {
    ngx_open_file_t              *file;          /* NULL: off */
    ngx_flag_t                    set;
    ngx_flag_t                    chain;
    ngx_flag_t                    anonymize;
    ngx_array_t                  *headers;       /* ngx_str_t, lower case */

    size_t                        buffer;        /* 0: a write per line */
    ngx_msec_t                    flush;

    ngx_shm_zone_t               *shm_zone;
    ngx_slab_pool_t              *shpool;
    ngx_http_sbx_audit_sh_t      *sh;

    /* worker-local, buffer= only: lines not written yet, and room for them
     * with their "seq" and "prev" */
    u_char                       *bstart;
    u_char                       *bpos;
    ngx_uint_t                    blines;
    u_char                       *out;
    size_t                        out_size;
    ngx_event_t                   flush_ev;
} ngx_http_sbx_audit_main_conf_t;


/* what "seq" and "prev" add to a line, at most */
#define NGX_HTTP_SBX_AUDIT_SUFFIX_MAX                                         \
    (sizeof(",\"seq\":,\"prev\":\"\"}\n") - 1 + NGX_INT64_LEN                \
     + 2 * NGX_HTTP_SBX_AUDIT_HASH_LEN)

/* the shortest line there can be: its fixed text alone */
#define NGX_HTTP_SBX_AUDIT_LINE_MIN    256


static ngx_int_t ngx_http_sbx_audit_log_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_audit_buffer(ngx_http_request_t *r,
    ngx_http_sbx_audit_main_conf_t *amcf, u_char *line, size_t len);
static void ngx_http_sbx_audit_flush(ngx_http_sbx_audit_main_conf_t *amcf,
    ngx_log_t *log);
static void ngx_http_sbx_audit_flush_handler(ngx_event_t *ev);
static void ngx_http_sbx_audit_file_flush(ngx_open_file_t *file,
    ngx_log_t *log);
static ngx_int_t ngx_http_sbx_audit_init_process(ngx_cycle_t *cycle);
static void ngx_http_sbx_audit_exit_process(ngx_cycle_t *cycle);
static u_char *ngx_http_sbx_audit_client(ngx_http_request_t *r,
    ngx_flag_t anonymize, u_char *buf);
static ngx_table_elt_t *ngx_http_sbx_audit_header(ngx_http_request_t *r,
    ngx_str_t *name);
static ngx_int_t ngx_http_sbx_audit_write(ngx_http_request_t *r,
    ngx_http_sbx_audit_main_conf_t *amcf, u_char *line, u_char *p,
    u_char *end);
static void ngx_http_sbx_audit_resync(ngx_log_t *log,
    ngx_http_sbx_audit_main_conf_t *amcf, ngx_fd_t fd, ngx_file_info_t *fi);
static ngx_int_t ngx_http_sbx_audit_hash(u_char *data, size_t len,
    u_char *md);

static ngx_int_t ngx_http_sbx_audit_init_zone(ngx_shm_zone_t *shm_zone,
    void *data);
static void *ngx_http_sbx_audit_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_audit_log(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_sbx_audit_init(ngx_conf_t *cf);


static ngx_str_t  ngx_http_sbx_audit_zone_name = ngx_string("sbx_audit");


/* request headers whose values never reach the audit log */
static ngx_str_t  ngx_http_sbx_audit_secret_headers[] = {
    ngx_string("authorization"),
    ngx_string("proxy-authorization"),
    ngx_string("cookie"),
    ngx_null_string
};


static ngx_command_t  ngx_http_sbx_audit_commands[] = {

    { ngx_string("sbx_audit_log"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_sbx_audit_log,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_audit_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_sbx_audit_init,               /* postconfiguration */

    ngx_http_sbx_audit_create_main_conf,   /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    NULL,                                  /* create location configuration */
    NULL                                   /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_audit_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_audit_module_ctx,        /* module context */
    ngx_http_sbx_audit_commands,           /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_sbx_audit_init_process,       /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_sbx_audit_exit_process,       /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* log phase: the line */

static ngx_int_t
ngx_http_sbx_audit_log_handler(ngx_http_request_t *r)
{
    u_char                           *line, *p, *end;
    size_t                            len;
    ngx_tm_t                          tm;
    ngx_str_t                         id, *name, *hv;
    ngx_uint_t                        i, status, decision;
    ngx_time_t                       *tp;
    ngx_table_elt_t                  *h;
    ngx_int_t                         helper_pid;
    ngx_msec_t                        helper_ms;
    ngx_http_sbx_ctx_t               *ctx;
    ngx_http_sbx_connector_t         *c;
    ngx_http_sbx_audit_main_conf_t   *amcf;

    amcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_audit_module);

    /* a subrequest (log_subrequest on) is not a request of its own */

    if (amcf->file == NULL || amcf->sh == NULL || r != r->main) {
        return NGX_OK;
    }

    ctx = ngx_http_sbx_log_ctx(r);
    if (ctx == NULL) {
        return NGX_OK;
    }

    c = ctx->connector;
    decision = ngx_http_sbx_log_decision(ctx);

    ngx_http_sbx_request_id(r, &id);

    /* an upper bound of the line: fixed text, numbers, strings escaped */

    len = sizeof("{\"ts\":\"1970-09-28T12:00:00.000Z\",\"id\":,"
                 "\"connector\":,\"version\":,\"script_sha256\":,"
                 "\"decision\":,\"status\":,\"client\":,\"country\":,"
                 "\"limit\":,\"duration_ms\":,\"helper_ms\":,\"redis_ms\":,"
                 "\"bytes_in\":,\"bytes_out\":,\"worker\":,\"helper\":,"
                 "\"headers\":,\"seq\":,\"prev\":}\n")
          + 12 * NGX_OFF_T_LEN
          + ngx_http_sbx_json_str_len(id.len)
          + ngx_http_sbx_json_str_len(c->name.len)
          + ngx_http_sbx_json_str_len(c->version.len)
          + ngx_http_sbx_json_str_len(c->digest_hex.len)
          + ngx_http_sbx_json_str_len(
                ngx_http_sbx_decision_names[decision].len)
          + ngx_http_sbx_json_str_len(NGX_SOCKADDR_STRLEN)
          + ngx_http_sbx_json_str_len(ctx->country.len)
          + ngx_http_sbx_json_str_len(ctx->limit.len)
          + 2 * NGX_HTTP_SBX_AUDIT_HASH_LEN + 2
          + 16;

    if (amcf->headers) {
        name = amcf->headers->elts;

        for (i = 0; i < amcf->headers->nelts; i++) {
            len += ngx_http_sbx_json_str_len(name[i].len) + sizeof(":,") - 1
                   + ngx_http_sbx_json_str_len(NGX_HTTP_SBX_AUDIT_HEADER_MAX);
        }
    }

    line = ngx_pnalloc(r->pool, len);
    if (line == NULL) {
        return NGX_ERROR;
    }

    end = line + len;

    tp = ngx_timeofday();
    ngx_gmtime(tp->sec, &tm);

    p = ngx_slprintf(line, end,
                     "{\"ts\":\"%4d-%02d-%02dT%02d:%02d:%02d.%03MZ\",\"id\":",
                     tm.ngx_tm_year, tm.ngx_tm_mon, tm.ngx_tm_mday,
                     tm.ngx_tm_hour, tm.ngx_tm_min, tm.ngx_tm_sec,
                     tp->msec);

#define ngx_http_sbx_audit_str(s)                                             \
    if ((s)->len) {                                                           \
        p = ngx_http_sbx_json_str(p, (s)->data, (s)->len);                    \
    } else {                                                                  \
        p = ngx_cpymem(p, "null", 4);                                         \
    }

    ngx_http_sbx_audit_str(&id);

    p = ngx_cpymem(p, ",\"connector\":", sizeof(",\"connector\":") - 1);
    p = ngx_http_sbx_json_str(p, c->name.data, c->name.len);

    p = ngx_cpymem(p, ",\"version\":", sizeof(",\"version\":") - 1);
    ngx_http_sbx_audit_str(&c->version);

    p = ngx_cpymem(p, ",\"script_sha256\":",
                   sizeof(",\"script_sha256\":") - 1);
    ngx_http_sbx_audit_str(&c->digest_hex);

    p = ngx_cpymem(p, ",\"decision\":", sizeof(",\"decision\":") - 1);
    p = ngx_http_sbx_json_str(p, ngx_http_sbx_decision_names[decision].data,
                              ngx_http_sbx_decision_names[decision].len);

    /* as $status */

    status = r->err_status ? r->err_status : r->headers_out.status;

    if (status) {
        p = ngx_slprintf(p, end, ",\"status\":%ui,\"client\":", status);

    } else {
        p = ngx_cpymem(p, ",\"status\":null,\"client\":",
                       sizeof(",\"status\":null,\"client\":") - 1);
    }

    p = ngx_http_sbx_audit_client(r, amcf->anonymize, p);

    p = ngx_cpymem(p, ",\"country\":", sizeof(",\"country\":") - 1);
    ngx_http_sbx_audit_str(&ctx->country);

    p = ngx_cpymem(p, ",\"limit\":", sizeof(",\"limit\":") - 1);
    ngx_http_sbx_audit_str(&ctx->limit);

    p = ngx_slprintf(p, end, ",\"duration_ms\":%M,\"helper_ms\":",
                     ngx_http_sbx_request_ms(r));

    helper_pid = ctx->helper_pid;
    helper_ms = ctx->helper_ms;

    /* the client went away while a helper had the call: its time so far */
    if (ctx->call && ctx->call->helper && ctx->call->start) {
        helper_pid = ctx->call->helper_pid;
        helper_ms += ngx_current_msec - ctx->call->start;
    }

    /* no helper ran anything: null, as for Redis without a rate limit */

    if (helper_pid || helper_ms) {
        p = ngx_slprintf(p, end, "%M", helper_ms);

    } else {
        p = ngx_cpymem(p, "null", 4);
    }

    p = ngx_cpymem(p, ",\"redis_ms\":", sizeof(",\"redis_ms\":") - 1);

    if (ctx->redis_ms || ctx->ratelimit_remaining >= 0
        || ctx->ratelimit_fallback)
    {
        p = ngx_slprintf(p, end, "%M", ctx->redis_ms);

    } else {
        p = ngx_cpymem(p, "null", 4);
    }

    p = ngx_slprintf(p, end, ",\"bytes_in\":%O,\"bytes_out\":%O,\"worker\":%P,"
                     "\"helper\":", r->request_length, r->connection->sent,
                     ngx_pid);

    if (helper_pid) {
        p = ngx_slprintf(p, end, "%i", helper_pid);

    } else {
        p = ngx_cpymem(p, "null", 4);
    }

    p = ngx_cpymem(p, ",\"headers\":", sizeof(",\"headers\":") - 1);

    if (amcf->headers == NULL) {
        p = ngx_cpymem(p, "null", 4);

    } else {
        *p++ = '{';
        name = amcf->headers->elts;

        for (i = 0; i < amcf->headers->nelts; i++) {
            if (i) {
                *p++ = ',';
            }

            p = ngx_http_sbx_json_str(p, name[i].data, name[i].len);
            *p++ = ':';

            h = ngx_http_sbx_audit_header(r, &name[i]);

            if (h == NULL) {
                p = ngx_cpymem(p, "null", 4);
                continue;
            }

            hv = &h->value;
            p = ngx_http_sbx_json_str(p, hv->data,
                                      ngx_min(hv->len,
                                              NGX_HTTP_SBX_AUDIT_HEADER_MAX));
        }

        *p++ = '}';
    }

#undef ngx_http_sbx_audit_str

    /* "seq", "prev" and the end: under the lock */

    if (amcf->buffer && amcf->bstart) {
        return ngx_http_sbx_audit_buffer(r, amcf, line, p - line);
    }

    return ngx_http_sbx_audit_write(r, amcf, line, p, end);
}


/* buffer=: keep the line (its "seq" and "prev" come at the flush) */

static ngx_int_t
ngx_http_sbx_audit_buffer(ngx_http_request_t *r,
    ngx_http_sbx_audit_main_conf_t *amcf, u_char *line, size_t len)
{
    u_char  *end;

    /* the lines kept and their "seq" and "prev" always fit amcf->out */
    if (amcf->bpos + len + 1 > amcf->bstart + amcf->buffer
        || (size_t) (amcf->bpos - amcf->bstart) + len + 1
           + (amcf->blines + 1) * NGX_HTTP_SBX_AUDIT_SUFFIX_MAX
           > amcf->out_size)
    {
        ngx_http_sbx_audit_flush(amcf, r->connection->log);
    }

    if (len + 1 > amcf->buffer) {
        /* larger than the whole buffer: on its own, at once */
        end = line + len + NGX_HTTP_SBX_AUDIT_SUFFIX_MAX;
        return ngx_http_sbx_audit_write(r, amcf, line, line + len, end);
    }

    /* a line never holds a raw newline: it separates the lines kept */
    amcf->bpos = ngx_cpymem(amcf->bpos, line, len);
    *amcf->bpos++ = '\n';
    amcf->blines++;

    if (!amcf->flush_ev.timer_set) {
        ngx_add_timer(&amcf->flush_ev, amcf->flush);
    }

    return NGX_OK;
}


/*
 * Writes the lines kept, each with its "seq" and "prev", in one write():
 * the chain state is taken and advanced under the zone's mutex, as for a
 * single line.
 */

static void
ngx_http_sbx_audit_flush(ngx_http_sbx_audit_main_conf_t *amcf,
    ngx_log_t *log)
{
    u_char                   *p, *nl, *o, *start;
    u_char                    prev[NGX_HTTP_SBX_AUDIT_HASH_LEN];
    size_t                    len;
    ssize_t                   n;
    uint64_t                  seq;
    ngx_fd_t                  fd;
    ngx_err_t                 err;
    ngx_flag_t                has_prev;
    ngx_file_info_t           fi;
    ngx_http_sbx_audit_sh_t  *sh;

    if (amcf->flush_ev.timer_set) {
        ngx_del_timer(&amcf->flush_ev);
    }

    if (amcf->bstart == NULL || amcf->bpos == amcf->bstart) {
        return;
    }

    fd = amcf->file->fd;
    sh = amcf->sh;

    if (fd == NGX_INVALID_FILE || sh == NULL) {
        amcf->bpos = amcf->bstart;
        amcf->blines = 0;
        return;
    }

    ngx_shmtx_lock(&amcf->shpool->mutex);

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        err = ngx_errno;
        ngx_shmtx_unlock(&amcf->shpool->mutex);

        ngx_log_error(NGX_LOG_ERR, log, err,
                      "sbx_audit_log: fstat(\"%V\") failed, %uz bytes of "
                      "audit lines lost", &amcf->file->name,
                      (size_t) (amcf->bpos - amcf->bstart));
        amcf->bpos = amcf->bstart;
        amcf->blines = 0;
        return;
    }

    if (!sh->known
        || sh->dev != fi.st_dev
        || sh->ino != fi.st_ino
        || sh->size != fi.st_size
        || (amcf->chain && !sh->has_prev && fi.st_size > 0))
    {
        ngx_http_sbx_audit_resync(log, amcf, fd, &fi);
    }

    seq = sh->seq;
    has_prev = amcf->chain && sh->has_prev;
    ngx_memcpy(prev, sh->prev, NGX_HTTP_SBX_AUDIT_HASH_LEN);

    o = amcf->out;

    for (p = amcf->bstart; p < amcf->bpos; p = nl + 1) {
        nl = ngx_strlchr(p, amcf->bpos, '\n');
        if (nl == NULL) {
            break;
        }

        start = o;
        o = ngx_cpymem(o, p, nl - p);
        o = ngx_sprintf(o, ",\"seq\":%uL,\"prev\":", ++seq);

        if (has_prev) {
            *o++ = '"';
            o = ngx_hex_dump(o, prev, NGX_HTTP_SBX_AUDIT_HASH_LEN);
            *o++ = '"';

        } else {
            o = ngx_cpymem(o, "null", 4);
        }

        *o++ = '}';

        has_prev = amcf->chain
                   && ngx_http_sbx_audit_hash(start, o - start, prev)
                      == NGX_OK;

        *o++ = '\n';
    }

    len = o - amcf->out;
    amcf->bpos = amcf->bstart;
    amcf->blines = 0;

    n = ngx_write_fd(fd, amcf->out, len);

    if (n == (ssize_t) len) {
        sh->seq = seq;
        sh->size = fi.st_size + n;
        sh->has_prev = has_prev;
        ngx_memcpy(sh->prev, prev, NGX_HTTP_SBX_AUDIT_HASH_LEN);

        ngx_shmtx_unlock(&amcf->shpool->mutex);
        return;
    }

    err = ngx_errno;

    /* whatever reached the file, the next line starts from what is there */
    sh->known = 0;

    ngx_shmtx_unlock(&amcf->shpool->mutex);

    if (n == -1) {
        ngx_log_error(NGX_LOG_ERR, log, err,
                      "sbx_audit_log: write() to \"%V\" failed, %uz bytes "
                      "of audit lines lost", &amcf->file->name, len);

    } else {
        ngx_log_error(NGX_LOG_ERR, log, 0,
                      "sbx_audit_log: write() to \"%V\" was incomplete: "
                      "%z of %uz", &amcf->file->name, n, len);
    }
}


static void
ngx_http_sbx_audit_flush_handler(ngx_event_t *ev)
{
    ngx_http_sbx_audit_flush(ev->data, ev->log);
}


/* nginx calls it before it reopens the file (USR1) */

static void
ngx_http_sbx_audit_file_flush(ngx_open_file_t *file, ngx_log_t *log)
{
    ngx_http_sbx_audit_flush(file->data, log);
}


static ngx_int_t
ngx_http_sbx_audit_init_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_audit_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_sbx_audit_module);

    if (amcf == NULL || amcf->file == NULL || amcf->buffer == 0) {
        return NGX_OK;
    }

    amcf->bstart = ngx_palloc(cycle->pool, amcf->buffer);

    amcf->out_size = amcf->buffer
                     + (amcf->buffer / NGX_HTTP_SBX_AUDIT_LINE_MIN + 1)
                       * NGX_HTTP_SBX_AUDIT_SUFFIX_MAX;
    amcf->out = ngx_palloc(cycle->pool, amcf->out_size);

    if (amcf->bstart == NULL || amcf->out == NULL) {
        return NGX_ERROR;
    }

    amcf->bpos = amcf->bstart;

    amcf->flush_ev.handler = ngx_http_sbx_audit_flush_handler;
    amcf->flush_ev.data = amcf;
    amcf->flush_ev.log = cycle->log;
    amcf->flush_ev.cancelable = 1;

    return NGX_OK;
}


static void
ngx_http_sbx_audit_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_audit_main_conf_t  *amcf;

    amcf = ngx_http_cycle_get_module_main_conf(cycle,
                                               ngx_http_sbx_audit_module);

    if (amcf && amcf->file) {
        ngx_http_sbx_audit_flush(amcf, cycle->log);
    }
}


static u_char *
ngx_http_sbx_audit_client(ngx_http_request_t *r, ngx_flag_t anonymize,
    u_char *buf)
{
    u_char                text[NGX_SOCKADDR_STRLEN];
    size_t                len;
    ngx_sockaddr_t        sa;
    struct sockaddr_in   *sin;
#if (NGX_HAVE_INET6)
    u_char               *a;
    struct sockaddr_in6  *sin6;
#endif

    if (r->connection->socklen > (socklen_t) sizeof(ngx_sockaddr_t)
        || r->connection->socklen == 0)
    {
        return ngx_http_sbx_json_str(buf, r->connection->addr_text.data,
                                     r->connection->addr_text.len);
    }

    ngx_memcpy(&sa, r->connection->sockaddr, r->connection->socklen);

    switch (sa.sockaddr.sa_family) {

    case AF_INET:
        if (anonymize) {
            sin = &sa.sockaddr_in;
            sin->sin_addr.s_addr &= htonl(0xffffff00);
        }

        break;

#if (NGX_HAVE_INET6)
    case AF_INET6:
        if (anonymize) {
            sin6 = &sa.sockaddr_in6;
            a = sin6->sin6_addr.s6_addr;

            if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
                /* an IPv4 client: /24 */
                a[15] = 0;

            } else {
                /* /48 */
                ngx_memzero(a + 6, 10);
            }

            sin6->sin6_scope_id = 0;
        }

        break;
#endif

    default:
        return ngx_http_sbx_json_str(buf, r->connection->addr_text.data,
                                     r->connection->addr_text.len);
    }

    len = ngx_sock_ntop(&sa.sockaddr, r->connection->socklen, text,
                        NGX_SOCKADDR_STRLEN, 0);

    return ngx_http_sbx_json_str(buf, text, len);
}


static ngx_table_elt_t *
ngx_http_sbx_audit_header(ngx_http_request_t *r, ngx_str_t *name)
{
    ngx_uint_t        i;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h;

    part = &r->headers_in.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                return NULL;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].key.len == name->len
            && ngx_strncasecmp(h[i].key.data, name->data, name->len) == 0)
        {
            return &h[i];
        }
    }
}


/*
 * Appends "seq" and "prev" to the line being built in [line, p) and writes
 * it, all under the zone's mutex so that seq, the chain and the order of
 * the lines in the file agree.
 */

static ngx_int_t
ngx_http_sbx_audit_write(ngx_http_request_t *r,
    ngx_http_sbx_audit_main_conf_t *amcf, u_char *line, u_char *p,
    u_char *end)
{
    u_char                    *q;
    size_t                     len;
    ssize_t                    n;
    ngx_fd_t                   fd;
    ngx_err_t                  err;
    ngx_file_info_t            fi;
    ngx_http_sbx_audit_sh_t   *sh;

    fd = amcf->file->fd;
    sh = amcf->sh;

    if (fd == NGX_INVALID_FILE) {
        return NGX_OK;
    }

    ngx_shmtx_lock(&amcf->shpool->mutex);

    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        err = ngx_errno;
        ngx_shmtx_unlock(&amcf->shpool->mutex);

        ngx_log_error(NGX_LOG_ERR, r->connection->log, err,
                      "sbx_audit_log: fstat(\"%V\") failed",
                      &amcf->file->name);
        return NGX_OK;
    }

    if (!sh->known
        || sh->dev != fi.st_dev
        || sh->ino != fi.st_ino
        || sh->size != fi.st_size
        || (amcf->chain && !sh->has_prev && fi.st_size > 0))
    {
        ngx_http_sbx_audit_resync(r->connection->log, amcf, fd, &fi);
    }

    q = ngx_slprintf(p, end, ",\"seq\":%uL,\"prev\":", sh->seq + 1);

    if (amcf->chain && sh->has_prev) {
        *q++ = '"';
        q = ngx_hex_dump(q, sh->prev, NGX_HTTP_SBX_AUDIT_HASH_LEN);
        *q++ = '"';

    } else {
        q = ngx_cpymem(q, "null", 4);
    }

    *q++ = '}';
    len = q - line;
    *q++ = '\n';

    n = ngx_write_fd(fd, line, len + 1);

    if (n == (ssize_t) len + 1) {
        sh->seq++;
        sh->size = fi.st_size + n;

        if (amcf->chain
            && ngx_http_sbx_audit_hash(line, len, sh->prev) == NGX_OK)
        {
            sh->has_prev = 1;

        } else {
            sh->has_prev = 0;
        }

        ngx_shmtx_unlock(&amcf->shpool->mutex);

        return NGX_OK;
    }

    err = ngx_errno;

    /* whatever reached the file, the next line starts from what is there */
    sh->known = 0;

    ngx_shmtx_unlock(&amcf->shpool->mutex);

    if (n == -1) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, err,
                      "sbx_audit_log: write() to \"%V\" failed",
                      &amcf->file->name);

    } else {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx_audit_log: write() to \"%V\" was incomplete: "
                      "%z of %uz", &amcf->file->name, n, len + 1);
    }

    return NGX_OK;
}


/*
 * The state is not that of the file behind fd: take seq and the hash of
 * the file's last line.  The descriptor is write-only, so the file is read
 * through /proc/self/fd, which names this very file even once renamed.
 * Called with the zone's mutex held.
 */

static void
ngx_http_sbx_audit_resync(ngx_log_t *log,
    ngx_http_sbx_audit_main_conf_t *amcf, ngx_fd_t fd, ngx_file_info_t *fi)
{
    u_char                   *buf, *last, *start, *s;
    off_t                     size, window;
    ssize_t                   n;
    ngx_fd_t                  rfd;
    ngx_file_info_t           rfi;
    ngx_http_sbx_audit_sh_t  *sh;
    u_char                    path[sizeof("/proc/self/fd/") + NGX_INT_T_LEN];

    sh = amcf->sh;

    sh->known = 1;
    sh->dev = fi->st_dev;
    sh->ino = fi->st_ino;
    sh->size = fi->st_size;
    sh->seq = 0;
    sh->has_prev = 0;

    size = fi->st_size;

    if (size == 0) {
        return;
    }

    ngx_sprintf(path, "/proc/self/fd/%d%Z", fd);

    rfd = ngx_open_file(path, NGX_FILE_RDONLY, NGX_FILE_OPEN, 0);

    if (rfd == NGX_INVALID_FILE) {
        ngx_log_error(NGX_LOG_ERR, log, ngx_errno,
                      "sbx_audit_log: cannot read the last line of \"%V\", "
                      "its chain starts again", &amcf->file->name);
        return;
    }

    buf = NULL;
    start = NULL;
    last = NULL;

    if (ngx_fd_info(rfd, &rfi) == NGX_FILE_ERROR
        || rfi.st_dev != fi->st_dev || rfi.st_ino != fi->st_ino)
    {
        ngx_log_error(NGX_LOG_ERR, log, ngx_errno,
                      "sbx_audit_log: cannot read the last line of \"%V\", "
                      "its chain starts again", &amcf->file->name);
        goto done;
    }

    /* grow a window from the end until it holds the whole last line */

    for (window = 4096; /* void */ ; window *= 2) {
        window = ngx_min(window, size);

        buf = ngx_alloc((size_t) window, log);
        if (buf == NULL) {
            goto done;
        }

        n = pread(rfd, buf, (size_t) window, size - window);

        if (n != (ssize_t) window) {
            ngx_log_error(NGX_LOG_ERR, log, ngx_errno,
                          "sbx_audit_log: cannot read the last line of "
                          "\"%V\", its chain starts again",
                          &amcf->file->name);
            goto done;
        }

        last = buf + window;

        if (last[-1] == '\n') {
            last--;
        }

        for (start = last; start > buf && start[-1] != '\n'; start--) {
            /* void */
        }

        if (start > buf || window == size) {
            break;
        }

        ngx_free(buf);
        buf = NULL;

        if (window >= NGX_HTTP_SBX_AUDIT_TAIL_MAX) {
            ngx_log_error(NGX_LOG_ERR, log, 0,
                          "sbx_audit_log: the last line of \"%V\" is longer "
                          "than %d bytes, its chain starts again",
                          &amcf->file->name, NGX_HTTP_SBX_AUDIT_TAIL_MAX);
            goto done;
        }
    }

    /* "seq":N of the last line, if it has one */

    for (s = last - (sizeof("\"seq\":") - 1); s >= start; s--) {
        if (ngx_strncmp(s, "\"seq\":", sizeof("\"seq\":") - 1) == 0) {
            s += sizeof("\"seq\":") - 1;

            while (s < last && *s >= '0' && *s <= '9') {
                sh->seq = sh->seq * 10 + (*s++ - '0');
            }

            break;
        }
    }

    if (ngx_http_sbx_audit_hash(start, last - start, sh->prev) == NGX_OK) {
        sh->has_prev = 1;
    }

done:

    if (buf) {
        ngx_free(buf);
    }

    (void) ngx_close_file(rfd);
}


static ngx_int_t
ngx_http_sbx_audit_hash(u_char *data, size_t len, u_char *md)
{
    unsigned int  mdlen;

    if (EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL) != 1
        || mdlen != NGX_HTTP_SBX_AUDIT_HASH_LEN)
    {
        return NGX_ERROR;
    }

    return NGX_OK;
}


/* configuration */

static ngx_int_t
ngx_http_sbx_audit_init_zone(ngx_shm_zone_t *shm_zone, void *data)
{
    ngx_http_sbx_audit_main_conf_t  *oamcf = data;

    ngx_slab_pool_t                 *shpool;
    ngx_http_sbx_audit_main_conf_t  *amcf;

    amcf = shm_zone->data;
    shpool = (ngx_slab_pool_t *) shm_zone->shm.addr;

    amcf->shpool = shpool;

    if (oamcf) {
        amcf->sh = oamcf->sh;
        return NGX_OK;
    }

    if (shm_zone->shm.exists) {
        amcf->sh = shpool->data;
        return NGX_OK;
    }

    amcf->sh = ngx_slab_calloc(shpool, sizeof(ngx_http_sbx_audit_sh_t));
    if (amcf->sh == NULL) {
        return NGX_ERROR;
    }

    shpool->data = amcf->sh;
    shpool->log_ctx = (u_char *) " in sbx_audit zone";

    return NGX_OK;
}


static void *
ngx_http_sbx_audit_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_audit_main_conf_t  *amcf;

    amcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_audit_main_conf_t));
    if (amcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     amcf->file = NULL;
     *     amcf->set = 0;
     *     amcf->headers = NULL;
     *     amcf->sh = NULL;
     */

    return amcf;
}


static char *
ngx_http_sbx_audit_flag(ngx_conf_t *cf, ngx_str_t *v, size_t skip,
    ngx_flag_t *flag)
{
    ngx_str_t  s;

    s.data = v->data + skip;
    s.len = v->len - skip;

    if (s.len == 2 && ngx_strncmp(s.data, "on", 2) == 0) {
        *flag = 1;
        return NGX_CONF_OK;
    }

    if (s.len == 3 && ngx_strncmp(s.data, "off", 3) == 0) {
        *flag = 0;
        return NGX_CONF_OK;
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"sbx_audit_log\" "
                       "(expected %*s=on or %*s=off)",
                       v, skip - 1, v->data, skip - 1, v->data);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_sbx_audit_headers(ngx_conf_t *cf,
    ngx_http_sbx_audit_main_conf_t *amcf, ngx_str_t *v)
{
    u_char      *p, *last, *start;
    ngx_str_t   *name, *secret;
    ngx_uint_t   i;

    amcf->headers = ngx_array_create(cf->pool, 4, sizeof(ngx_str_t));
    if (amcf->headers == NULL) {
        return NGX_CONF_ERROR;
    }

    p = v->data + sizeof("headers=") - 1;
    last = v->data + v->len;

    while (p < last) {
        start = p;

        while (p < last && *p != ',') {
            p++;
        }

        if (p == start) {
            goto invalid;
        }

        name = ngx_array_push(amcf->headers);
        if (name == NULL) {
            return NGX_CONF_ERROR;
        }

        name->len = p - start;
        name->data = ngx_pnalloc(cf->pool, name->len);
        if (name->data == NULL) {
            return NGX_CONF_ERROR;
        }

        for (i = 0; i < name->len; i++) {
            if (start[i] <= ' ' || start[i] >= 0x7f || start[i] == ':'
                || start[i] == '"' || start[i] == '\\')
            {
                goto invalid;
            }

            name->data[i] = ngx_tolower(start[i]);
        }

        for (secret = ngx_http_sbx_audit_secret_headers; secret->len;
             secret++)
        {
            if (secret->len == name->len
                && ngx_strncmp(secret->data, name->data, name->len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "\"sbx_audit_log\" never writes the "
                                   "value of the \"%V\" header; remove it "
                                   "from \"headers=\"", name);
                return NGX_CONF_ERROR;
            }
        }

        if (p < last) {
            p++;

            if (p == last) {
                goto invalid;
            }
        }
    }

    if (amcf->headers->nelts) {
        return NGX_CONF_OK;
    }

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid \"%V\" in \"sbx_audit_log\" (expected "
                       "headers=NAME[,NAME...] with header names)", v);

    return NGX_CONF_ERROR;
}


static char *
ngx_http_sbx_audit_log(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_audit_main_conf_t *amcf = conf;

    char        *rv;
    ssize_t      size;
    ngx_str_t   *value, s;
    ngx_msec_t   flush;
    ngx_uint_t   i;

    if (amcf->set) {
        return "is duplicate";
    }

    amcf->set = 1;
    amcf->chain = 1;
    amcf->anonymize = 0;

    value = cf->args->elts;

    if (value[1].len == 3 && ngx_strncmp(value[1].data, "off", 3) == 0) {
        if (cf->args->nelts > 2) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"sbx_audit_log off\" takes no parameters");
            return NGX_CONF_ERROR;
        }

        return NGX_CONF_OK;
    }

    if (value[1].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_audit_log\" needs a file path or \"off\"");
        return NGX_CONF_ERROR;
    }

    if (ngx_http_sbx_params_unique(cf, 2) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "chain=", 6) == 0) {
            rv = ngx_http_sbx_audit_flag(cf, &value[i], 6, &amcf->chain);

        } else if (ngx_strncmp(value[i].data, "anonymize=", 10) == 0) {
            rv = ngx_http_sbx_audit_flag(cf, &value[i], 10, &amcf->anonymize);

        } else if (ngx_strncmp(value[i].data, "buffer=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;
            size = ngx_parse_size(&s);

            if (size < 4096 || size > 16 * 1024 * 1024) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"buffer=\" \"%V\" in "
                                   "\"sbx_audit_log\" (expected a size from "
                                   "4k to 16m)", &value[i]);
                return NGX_CONF_ERROR;
            }

            amcf->buffer = (size_t) size;
            rv = NGX_CONF_OK;

        } else if (ngx_strncmp(value[i].data, "flush=", 6) == 0) {
            s.data = value[i].data + 6;
            s.len = value[i].len - 6;
            flush = ngx_parse_time(&s, 0);

            if (flush == (ngx_msec_t) NGX_ERROR || flush == 0) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"flush=\" \"%V\" in "
                                   "\"sbx_audit_log\" (expected a time such "
                                   "as 500ms or 1s)", &value[i]);
                return NGX_CONF_ERROR;
            }

            amcf->flush = flush;
            rv = NGX_CONF_OK;

        } else if (ngx_strncmp(value[i].data, "headers=", 8) == 0) {
            if (amcf->headers) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate \"headers=\" in "
                                   "\"sbx_audit_log\"");
                return NGX_CONF_ERROR;
            }

            rv = ngx_http_sbx_audit_headers(cf, amcf, &value[i]);

        } else {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid parameter \"%V\" in \"sbx_audit_log\" "
                               "(expected chain=on|off, anonymize=on|off, "
                               "headers=NAME,..., buffer=SIZE or flush=TIME)",
                               &value[i]);
            return NGX_CONF_ERROR;
        }

        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    if (amcf->flush && amcf->buffer == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"flush=\" in \"sbx_audit_log\" needs "
                           "\"buffer=\"");
        return NGX_CONF_ERROR;
    }

    if (amcf->flush == 0) {
        amcf->flush = 1000;
    }

    amcf->file = ngx_conf_open_file(cf->cycle, &value[1]);
    if (amcf->file == NULL) {
        return NGX_CONF_ERROR;
    }

    if (amcf->buffer) {
        if (amcf->file->flush) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "\"sbx_audit_log\" with \"buffer=\" cannot "
                               "share \"%V\" with another buffered log",
                               &value[1]);
            return NGX_CONF_ERROR;
        }

        amcf->file->flush = ngx_http_sbx_audit_file_flush;
        amcf->file->data = amcf;
    }

    amcf->shm_zone = ngx_shared_memory_add(cf, &ngx_http_sbx_audit_zone_name,
                                           8 * ngx_pagesize,
                                           &ngx_http_sbx_audit_module);
    if (amcf->shm_zone == NULL) {
        return NGX_CONF_ERROR;
    }

    amcf->shm_zone->init = ngx_http_sbx_audit_init_zone;
    amcf->shm_zone->data = amcf;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sbx_audit_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt             *h;
    ngx_http_core_main_conf_t       *cmcf;
    ngx_http_sbx_audit_main_conf_t  *amcf;

    amcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_sbx_audit_module);

    if (amcf->file == NULL) {
        return NGX_OK;
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_LOG_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_audit_log_handler;

    return NGX_OK;
}
