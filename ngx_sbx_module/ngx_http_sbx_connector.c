/*
 * ngx_http_sbx_connector.c: connector mode.  A location with
 * "sbx_connector NAME;" and another content handler (proxy_pass, ...) runs
 * the script's request hook before that handler and its response hook on
 * the answer:
 *
 *   request hook   a precontent-phase handler reads the client body, calls
 *                  the helper and applies the changed uri, args, headers
 *                  and body to the request before the phases go on; a
 *                  response table answers the client instead (the
 *                  upstream is never contacted);
 *   response hook  a header and a body filter hold the upstream's answer
 *                  (up to sbx_response_buffer bytes), hand it to the
 *                  script once it is complete and send what it returns.
 *
 * Hooks a script does not define cost nothing: no body is read early, no
 * helper is called, the answer streams through untouched.  With a response
 * hook the upstream is asked for an uncompressed answer (Accept-Encoding
 * is left out of the request it gets): the script reads the body and the
 * sandbox has no decompressor.  The filters never send from inside the
 * filter chain: a complete or failed answer is finished from a posted
 * event or from the helper's event.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"


#define NGX_HTTP_SBX_BUFFERED          0x08

#define NGX_HTTP_SBX_RESPONSE_BUFFER   (1024 * 1024)
#define NGX_HTTP_SBX_BODY_CHUNK        (64 * 1024)
#define NGX_HTTP_SBX_KEEP_HEADERS      8


/* request side */
#define NGX_HTTP_SBX_RQ_NONE           0
#define NGX_HTTP_SBX_RQ_WAITING        1    /* body or helper */
#define NGX_HTTP_SBX_RQ_DONE           2

/* response side */
#define NGX_HTTP_SBX_RS_NONE           0    /* not intercepted (yet) */
#define NGX_HTTP_SBX_RS_BUFFERING      1
#define NGX_HTTP_SBX_RS_OVERFLOW       2    /* over the cap: discarding */
#define NGX_HTTP_SBX_RS_READY          3    /* complete, call posted */
#define NGX_HTTP_SBX_RS_CALLING        4
#define NGX_HTTP_SBX_RS_OWN            5    /* sending our answer */
#define NGX_HTTP_SBX_RS_DONE           6
#define NGX_HTTP_SBX_RS_BROKEN         7    /* the upstream quit mid-answer */


typedef struct {
    size_t                        response_buffer;
} ngx_http_sbx_connector_loc_conf_t;


typedef struct {
    ngx_http_request_t           *request;
    ngx_uint_t                    rq_state;
    ngx_uint_t                    rs_state;

    ngx_http_sbx_call_t          *call;
    ngx_flag_t                    starting;       /* inside call_start */
    ngx_flag_t                    finished;       /* done ran in there */

    /* the upstream's answer */
    ngx_uint_t                    status;
    ngx_chain_t                  *body;
    ngx_chain_t                 **last;
    ngx_buf_t                    *tail;
    off_t                         size;
    size_t                        cap;

    ngx_event_t                   post_ev;
} ngx_http_sbx_connector_ctx_t;


static ngx_int_t ngx_http_sbx_connector_handler(ngx_http_request_t *r);
static void ngx_http_sbx_connector_body(ngx_http_request_t *r);
static void ngx_http_sbx_connector_request_done(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);
static void ngx_http_sbx_connector_request_finish(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx);
static ngx_int_t ngx_http_sbx_connector_apply(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call, sbx_rd_t *rd);
static ngx_int_t ngx_http_sbx_connector_set_headers(ngx_http_request_t *r,
    sbx_rd_t *rd, uint32_t n);
static ngx_int_t ngx_http_sbx_connector_identity(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_connector_push_header(ngx_http_request_t *r,
    u_char *name, size_t name_len, u_char *value, size_t value_len);

static ngx_int_t ngx_http_sbx_connector_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_connector_body_filter(ngx_http_request_t *r,
    ngx_chain_t *in);
static ngx_int_t ngx_http_sbx_connector_keep(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx, ngx_buf_t *b);
static void ngx_http_sbx_connector_posted(ngx_event_t *ev);
static void ngx_http_sbx_connector_response_start(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx);
static void ngx_http_sbx_connector_response_done(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);
static void ngx_http_sbx_connector_response_finish(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx);
static void ngx_http_sbx_connector_clean_header(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_connector_pass(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx);

static ngx_http_sbx_connector_ctx_t *ngx_http_sbx_connector_get_ctx(
    ngx_http_request_t *r);
static void ngx_http_sbx_connector_cleanup(void *data);
static ngx_http_sbx_connector_t *ngx_http_sbx_connector_of(
    ngx_http_request_t *r);

static void *ngx_http_sbx_connector_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_connector_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_sbx_connector_init(ngx_conf_t *cf);


static ngx_command_t  ngx_http_sbx_connector_commands[] = {

    { ngx_string("sbx_response_buffer"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_size_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sbx_connector_loc_conf_t, response_buffer),
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_connector_module_ctx = {
    NULL,                                  /* preconfiguration */
    ngx_http_sbx_connector_init,           /* postconfiguration */

    NULL,                                  /* create main configuration */
    NULL,                                  /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sbx_connector_create_loc_conf, /* create location configuration */
    ngx_http_sbx_connector_merge_loc_conf  /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_connector_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_connector_module_ctx,    /* module context */
    ngx_http_sbx_connector_commands,       /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


/* request headers the host sets itself */
static ngx_str_t  ngx_http_sbx_owned[] = {
    ngx_string("content-length"),
    ngx_string("transfer-encoding"),
    ngx_string("connection"),
    ngx_string("keep-alive"),
    ngx_string("proxy-connection"),
    ngx_string("te"),
    ngx_string("trailer"),
    ngx_string("upgrade"),
    ngx_null_string
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;
static ngx_http_output_body_filter_pt    ngx_http_next_body_filter;


/* the connector of a connector-mode location, or NULL */

static ngx_http_sbx_connector_t *
ngx_http_sbx_connector_of(ngx_http_request_t *r)
{
    ngx_http_sbx_loc_conf_t  *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);

    if (slcf == NULL || slcf->connector == NULL || slcf->content) {
        return NULL;
    }

    return slcf->connector;
}


static ngx_http_sbx_connector_ctx_t *
ngx_http_sbx_connector_get_ctx(ngx_http_request_t *r)
{
    ngx_pool_cleanup_t            *cln;
    ngx_http_sbx_connector_ctx_t  *cctx;

    cctx = ngx_http_get_module_ctx(r, ngx_http_sbx_connector_module);
    if (cctx) {
        return cctx;
    }

    cctx = ngx_pcalloc(r->pool, sizeof(ngx_http_sbx_connector_ctx_t));
    if (cctx == NULL) {
        return NULL;
    }

    cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == NULL) {
        return NULL;
    }

    cctx->request = r;
    cctx->last = &cctx->body;

    cctx->post_ev.handler = ngx_http_sbx_connector_posted;
    cctx->post_ev.data = cctx;
    cctx->post_ev.log = r->connection->log;

    cln->handler = ngx_http_sbx_connector_cleanup;
    cln->data = cctx;

    ngx_http_set_ctx(r, cctx, ngx_http_sbx_connector_module);

    return cctx;
}


static void
ngx_http_sbx_connector_cleanup(void *data)
{
    ngx_http_sbx_connector_ctx_t  *cctx = data;

    if (cctx->post_ev.posted) {
        ngx_delete_posted_event(&cctx->post_ev);
    }
}


/* ---- request hook: precontent phase ---- */

static ngx_int_t
ngx_http_sbx_connector_handler(ngx_http_request_t *r)
{
    ngx_int_t                      rc;
    ngx_http_sbx_connector_t      *c;
    ngx_http_sbx_connector_ctx_t  *cctx;

    if (r != r->main) {
        return NGX_DECLINED;
    }

    c = ngx_http_sbx_connector_of(r);
    if (c == NULL) {
        return NGX_DECLINED;
    }

    cctx = ngx_http_sbx_connector_get_ctx(r);
    if (cctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    switch (cctx->rq_state) {

    case NGX_HTTP_SBX_RQ_DONE:
        return NGX_DECLINED;

    case NGX_HTTP_SBX_RQ_WAITING:
        return NGX_DONE;
    }

    if (c->hooks & SBX_HAS_RESPONSE) {
        /* the response hook sees the body the upstream received */
        r->preserve_body = 1;
    }

    if (!(c->hooks & SBX_HAS_REQUEST)) {
        if ((c->hooks & SBX_HAS_RESPONSE)
            && ngx_http_sbx_connector_identity(r) != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        cctx->rq_state = NGX_HTTP_SBX_RQ_DONE;
        ngx_http_sbx_set_decision(r, NGX_HTTP_SBX_ALLOWED);
        return NGX_DECLINED;
    }

    cctx->rq_state = NGX_HTTP_SBX_RQ_WAITING;

    /* the whole body goes to the script, so keep it in memory if it fits */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_sbx_connector_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    ngx_http_finalize_request(r, NGX_DONE);

    return NGX_DONE;
}


static void
ngx_http_sbx_connector_body(ngx_http_request_t *r)
{
    ngx_int_t                      rc;
    ngx_http_sbx_ctx_t            *ctx;
    ngx_http_sbx_call_t           *call;
    ngx_http_sbx_connector_t      *c;
    ngx_http_sbx_connector_ctx_t  *cctx;

    c = ngx_http_sbx_connector_of(r);
    ctx = ngx_http_sbx_get_ctx(r);
    cctx = ngx_http_get_module_ctx(r, ngx_http_sbx_connector_module);

    if (c == NULL || ctx == NULL || cctx == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    /* nothing runs the phases while the helper works */
    r->write_event_handler = ngx_http_request_empty_handler;

    call = ngx_http_sbx_call_create(r, c, SBX_HOOK_REQUEST, NULL,
                                    ngx_http_sbx_connector_request_done);
    if (call == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    cctx->call = call;
    cctx->finished = 0;

    cctx->starting = 1;
    rc = ngx_http_sbx_call_start(r, call);
    cctx->starting = 0;

    if (rc == NGX_ERROR) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    if (rc == NGX_AGAIN && !cctx->finished) {
        ctx->waiting = 1;

        /*
         * as in content mode: a client that closes its connection ends the
         * request (499) and cancels the call, queued or running
         */
        r->read_event_handler = ngx_http_test_reading;
        return;
    }

    /* refused at once, or finished inside ngx_http_sbx_call_start() */
    ngx_http_sbx_connector_request_finish(r, cctx);
}


static void
ngx_http_sbx_connector_request_done(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call)
{
    ngx_connection_t              *c;
    ngx_http_sbx_connector_ctx_t  *cctx;

    c = r->connection;

    cctx = ngx_http_get_module_ctx(r, ngx_http_sbx_connector_module);

    if (cctx->starting) {
        cctx->finished = 1;
        return;
    }

    ngx_http_set_log_request(c->log, r);

    ngx_http_sbx_connector_request_finish(r, cctx);

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_sbx_connector_request_finish(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx)
{
    sbx_rd_t              rd;
    ngx_int_t             rc;
    ngx_http_sbx_call_t  *call = cctx->call;

    /* what follows (proxy_pass) sets its own, e.g. proxy_ignore_client_abort */
    r->read_event_handler = ngx_http_block_reading;

    if (call->outcome != SBX_OUT_RESPONSE || call->result == NULL) {
        ngx_http_finalize_request(r,
                                  ngx_http_sbx_call_fail(r, call, "request"));
        return;
    }

    if (ngx_http_sbx_ipc_result(r, call, &rd) != NGX_OK) {
        call->outcome = 0;
        ngx_http_finalize_request(r,
                                  ngx_http_sbx_call_fail(r, call, "request"));
        return;
    }

    switch (call->outcome) {

    case SBX_OUT_RESPONSE:
        /* short-circuit: the upstream is never contacted */
        ngx_http_finalize_request(r, ngx_http_sbx_content_send(r, call, &rd));
        return;

    case SBX_OUT_REQUEST:
        rc = ngx_http_sbx_connector_apply(r, call, &rd);

        if (rc != NGX_OK) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "sbx: connector \"%V\": invalid request from "
                          "helper %i", &call->connector->name,
                          call->helper_pid);
            ngx_http_finalize_request(r,
                ngx_http_sbx_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                        NGX_HTTP_SBX_TRANSFORM_ERROR, 0));
            return;
        }

        break;

    case SBX_OUT_NOHOOK:
        /* pass the request through untouched */
        break;

    default:
        ngx_http_finalize_request(r,
                                  ngx_http_sbx_call_fail(r, call, "request"));
        return;
    }

    if ((call->connector->hooks & SBX_HAS_RESPONSE)
        && ngx_http_sbx_connector_identity(r) != NGX_OK)
    {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ngx_http_sbx_set_decision(r, NGX_HTTP_SBX_ALLOWED);

    cctx->rq_state = NGX_HTTP_SBX_RQ_DONE;

    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}


/*
 * Applies SBX_OUT_REQUEST: str uri, str args, u32 nheaders, headers,
 * u8 has body, str body.  The headers are the full set the upstream gets
 * (the helper left out the ones the host owns: Content-Length,
 * Transfer-Encoding, Connection, ...); a body that is absent means none.
 * Everything stays in the RESULT payload, which lives in the request pool.
 */

static ngx_int_t
ngx_http_sbx_connector_apply(ngx_http_request_t *r, ngx_http_sbx_call_t *call,
    sbx_rd_t *rd)
{
    u_char                    *p;
    size_t                     i, len;
    uint8_t                    has_body;
    uint32_t                   n;
    sbx_rd_t                   hdrs;
    sbx_str_t                  uri, args, body;
    ngx_buf_t                 *b;
    ngx_chain_t               *cl;
    sbx_header_t               hd;
    ngx_http_core_loc_conf_t  *clcf;

    if (sbx_get_str(rd, &uri) != 0
        || sbx_get_str(rd, &args) != 0
        || sbx_get_count(rd, &n, SBX_MAX_HEADERS, 8) != 0)
    {
        return NGX_ERROR;
    }

    if (uri.len == 0 || uri.len > 8192 || uri.data[0] != '/') {
        return NGX_ERROR;
    }

    /* decoded: a space is fine (the proxy escapes it), controls are not */
    for (i = 0; i < uri.len; i++) {
        if (uri.data[i] < 0x20 || uri.data[i] == 0x7f) {
            return NGX_ERROR;
        }
    }

    for (i = 0; i < args.len; i++) {
        if (args.data[i] <= 0x20 || args.data[i] == 0x7f
            || args.data[i] == '#')
        {
            return NGX_ERROR;
        }
    }

    hdrs = *rd;

    for (i = 0; i < n; i++) {
        if (sbx_get_str(rd, &hd.name) != 0
            || sbx_get_str(rd, &hd.value) != 0
            || hd.name.len == 0
            || hd.name.len > SBX_MAX_HEADER_NAME
            || hd.value.len > SBX_MAX_HEADER_VALUE
            || !sbx_header_name_valid(hd.name.data, hd.name.len)
            || !sbx_header_value_valid(hd.value.data, hd.value.len))
        {
            return NGX_ERROR;
        }
    }

    body.data = NULL;
    body.len = 0;

    /* both fields are always there: has body 0 comes with an empty str */
    if (sbx_get_u8(rd, &has_body) != 0 || sbx_get_str(rd, &body) != 0) {
        return NGX_ERROR;
    }

    /* uri and args */

    if (uri.len != r->uri.len
        || ngx_memcmp(uri.data, r->uri.data, uri.len) != 0)
    {
        r->uri.data = (u_char *) uri.data;
        r->uri.len = uri.len;
        r->valid_unparsed_uri = 0;

        /* the uri is decoded: an upstream gets it escaped */
        r->quoted_uri = 1;

        /* proxy_pass with a uri replaces the location's prefix, if any */
        clcf = ngx_http_get_module_loc_conf(r, ngx_http_core_module);

        if (r->uri.len < clcf->name.len
            || ngx_strncmp(r->uri.data, clcf->name.data, clcf->name.len)
               != 0)
        {
            r->valid_location = 0;
        }

        ngx_http_set_exten(r);
    }

    /* no args: both may be NULL, which memcmp() may not be given */
    if (args.len != r->args.len
        || (args.len && ngx_memcmp(args.data, r->args.data, args.len) != 0))
    {
        r->args.data = (u_char *) args.data;
        r->args.len = args.len;
        r->valid_unparsed_uri = 0;
    }

    /* headers */

    if (ngx_http_sbx_connector_set_headers(r, &hdrs, n) != NGX_OK) {
        return NGX_ERROR;
    }

    /* body */

    if (r->request_body == NULL) {
        r->request_body = ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t));
        if (r->request_body == NULL) {
            return NGX_ERROR;
        }
    }

    r->request_body->bufs = NULL;
    r->request_body_no_buffering = 0;
    r->headers_in.chunked = 0;

    if (!has_body) {
        r->headers_in.content_length_n = -1;
        return NGX_OK;
    }

    r->headers_in.content_length_n = body.len;

    p = ngx_pnalloc(r->pool, NGX_OFF_T_LEN);
    if (p == NULL) {
        return NGX_ERROR;
    }

    len = ngx_sprintf(p, "%uz", body.len) - p;

    if (ngx_http_sbx_connector_push_header(r, (u_char *) "Content-Length",
                                           sizeof("Content-Length") - 1,
                                           p, len)
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    if (body.len == 0) {
        return NGX_OK;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    b->pos = (u_char *) body.data;
    b->last = (u_char *) body.data + body.len;
    b->start = b->pos;
    b->end = b->last;
    b->memory = 1;
    b->last_buf = 1;
    b->last_in_chain = 1;

    cl = ngx_alloc_chain_link(r->pool);
    if (cl == NULL) {
        return NGX_ERROR;
    }

    cl->buf = b;
    cl->next = NULL;

    r->request_body->bufs = cl;

    return NGX_OK;
}


/*
 * Replaces r->headers_in.headers with the script's set and points the
 * known-header fields of r->headers_in (host, content_type, cookies, ...)
 * at the new entries, so that variables and upstream modules see them.
 * The client's Upgrade stays (a script may not set it, but it may pass a
 * WebSocket handshake on: "proxy_set_header Upgrade $http_upgrade;").
 */

static ngx_int_t
ngx_http_sbx_connector_set_headers(ngx_http_request_t *r, sbx_rd_t *rd,
    uint32_t n)
{
    uint32_t            i;
    ngx_str_t           upgrade;
    ngx_uint_t          k;
    ngx_array_t        *a;
    sbx_header_t        hd;
    ngx_http_header_t  *hh;

    ngx_str_null(&upgrade);

    if (r->headers_in.upgrade) {
        upgrade = r->headers_in.upgrade->value;
    }

    if (ngx_list_init(&r->headers_in.headers, r->pool, n + 2,
                      sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    /* forget the old entries: pointers and the arrays of repeated ones */

    for (hh = ngx_http_headers_in; hh->name.len; hh++) {

        if (hh->offset == 0) {
            continue;
        }

        if (hh->offset == offsetof(ngx_http_headers_in_t, cookies)
#if (NGX_HTTP_X_FORWARDED_FOR)
            || hh->offset == offsetof(ngx_http_headers_in_t, x_forwarded_for)
#endif
           )
        {
            a = (ngx_array_t *) ((char *) &r->headers_in + hh->offset);
            a->nelts = 0;
            continue;
        }

        *(ngx_table_elt_t **) ((char *) &r->headers_in + hh->offset) = NULL;
    }

    for (i = 0; i < n; i++) {
        (void) sbx_get_str(rd, &hd.name);
        (void) sbx_get_str(rd, &hd.value);

        /* the host owns these; the helper left them out already */
        for (k = 0; ngx_http_sbx_owned[k].len; k++) {
            if (hd.name.len == ngx_http_sbx_owned[k].len
                && ngx_strncasecmp((u_char *) hd.name.data,
                                   ngx_http_sbx_owned[k].data,
                                   hd.name.len) == 0)
            {
                break;
            }
        }

        if (ngx_http_sbx_owned[k].len) {
            continue;
        }

        if (ngx_http_sbx_connector_push_header(r, (u_char *) hd.name.data,
                                               hd.name.len,
                                               (u_char *) hd.value.data,
                                               hd.value.len)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    if (upgrade.len) {
        return ngx_http_sbx_connector_push_header(r, (u_char *) "Upgrade",
                                                  sizeof("Upgrade") - 1,
                                                  upgrade.data, upgrade.len);
    }

    return NGX_OK;
}


/*
 * Leaves Accept-Encoding out of the headers the upstream gets (a new list
 * without it).  r->headers_in.accept_encoding stays as it was, so the gzip
 * filter still compresses the script's answer for a client that accepts
 * it; "proxy_set_header Accept-Encoding ...;" still sends what it says.
 */

#define ngx_http_sbx_accept_encoding(h)                                       \
    ((h)->key.len == sizeof("accept-encoding") - 1                            \
     && ngx_strncasecmp((h)->key.data, (u_char *) "accept-encoding",          \
                        (h)->key.len) == 0)

static ngx_int_t
ngx_http_sbx_connector_identity(ngx_http_request_t *r)
{
    ngx_uint_t        i, n, found;
    ngx_list_t        list;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *nh;

    n = 0;
    found = 0;

    for (part = &r->headers_in.headers.part; part; part = part->next) {
        h = part->elts;

        for (i = 0; i < part->nelts; i++) {
            n++;

            if (ngx_http_sbx_accept_encoding(&h[i])) {
                found = 1;
            }
        }
    }

    if (!found) {
        return NGX_OK;
    }

    if (ngx_list_init(&list, r->pool, n, sizeof(ngx_table_elt_t)) != NGX_OK) {
        return NGX_ERROR;
    }

    for (part = &r->headers_in.headers.part; part; part = part->next) {
        h = part->elts;

        for (i = 0; i < part->nelts; i++) {
            if (ngx_http_sbx_accept_encoding(&h[i])) {
                continue;
            }

            nh = ngx_list_push(&list);
            if (nh == NULL) {
                return NGX_ERROR;
            }

            *nh = h[i];
        }
    }

    r->headers_in.headers = list;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_connector_push_header(ngx_http_request_t *r, u_char *name,
    size_t name_len, u_char *value, size_t value_len)
{
    ngx_array_t                *a;
    ngx_table_elt_t            *h, **ph;
    ngx_http_header_t          *hh;
    ngx_http_core_main_conf_t  *cmcf;

    h = ngx_list_push(&r->headers_in.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->key.data = name;
    h->key.len = name_len;
    h->value.data = value;
    h->value.len = value_len;

    h->lowcase_key = ngx_pnalloc(r->pool, name_len);
    if (h->lowcase_key == NULL) {
        return NGX_ERROR;
    }

    h->hash = ngx_hash_strlow(h->lowcase_key, name, name_len);

    cmcf = ngx_http_get_module_main_conf(r, ngx_http_core_module);

    hh = ngx_hash_find(&cmcf->headers_in_hash, h->hash, h->lowcase_key,
                       name_len);

    if (hh == NULL || hh->offset == 0) {
        return NGX_OK;
    }

    if (hh->offset == offsetof(ngx_http_headers_in_t, cookies)
#if (NGX_HTTP_X_FORWARDED_FOR)
        || hh->offset == offsetof(ngx_http_headers_in_t, x_forwarded_for)
#endif
       )
    {
        a = (ngx_array_t *) ((char *) &r->headers_in + hh->offset);

        if (a->elts == NULL
            && ngx_array_init(a, r->pool, 1, sizeof(ngx_table_elt_t *))
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        ph = ngx_array_push(a);
        if (ph == NULL) {
            return NGX_ERROR;
        }

        *ph = h;
        return NGX_OK;
    }

    ph = (ngx_table_elt_t **) ((char *) &r->headers_in + hh->offset);

    if (*ph == NULL) {
        *ph = h;
    }

    return NGX_OK;
}


/* ---- response hook: filters ---- */

static ngx_int_t
ngx_http_sbx_connector_header_filter(ngx_http_request_t *r)
{
    ngx_http_sbx_connector_t           *c;
    ngx_http_sbx_connector_ctx_t       *cctx;
    ngx_http_sbx_connector_loc_conf_t  *sclcf;

    if (r != r->main || r->upstream == NULL) {
        return ngx_http_next_header_filter(r);
    }

    c = ngx_http_sbx_connector_of(r);

    if (c == NULL || !(c->hooks & SBX_HAS_RESPONSE)) {
        return ngx_http_next_header_filter(r);
    }

    cctx = ngx_http_sbx_connector_get_ctx(r);
    if (cctx == NULL) {
        return NGX_ERROR;
    }

    if (cctx->rs_state != NGX_HTTP_SBX_RS_NONE
        || r->headers_out.status == NGX_HTTP_SWITCHING_PROTOCOLS)
    {
        /* a 101 has no answer to transform: the tunnel goes through */
        return ngx_http_next_header_filter(r);
    }

    sclcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_connector_module);

    /* hold the answer: its header goes on once the script has run */

    cctx->status = r->headers_out.status;
    cctx->cap = sclcf->response_buffer;
    cctx->rs_state = NGX_HTTP_SBX_RS_BUFFERING;

    r->main_filter_need_in_memory = 1;
    r->buffered |= NGX_HTTP_SBX_BUFFERED;

    if (r->method == NGX_HTTP_HEAD
        || r->headers_out.status == NGX_HTTP_NO_CONTENT
        || r->headers_out.status == NGX_HTTP_NOT_MODIFIED)
    {
        /* no body comes, whatever Content-Length says */
        r->header_only = 1;

    } else if (r->headers_out.content_length_n > (off_t) cctx->cap) {
        /* refused from its header: the body is never read */
        cctx->size = r->headers_out.content_length_n;
        cctx->rs_state = NGX_HTTP_SBX_RS_OVERFLOW;
        ngx_post_event(&cctx->post_ev, &ngx_posted_events);
    }

    if (r->header_only) {
        /* no body follows */
        if (cctx->rs_state == NGX_HTTP_SBX_RS_BUFFERING) {
            cctx->rs_state = NGX_HTTP_SBX_RS_READY;
        }

        ngx_post_event(&cctx->post_ev, &ngx_posted_events);
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_connector_body_filter(ngx_http_request_t *r, ngx_chain_t *in)
{
    ngx_int_t                      rc;
    ngx_uint_t                     last, data;
    ngx_chain_t                   *cl;
    ngx_http_sbx_connector_ctx_t  *cctx;

    if (r != r->main) {
        return ngx_http_next_body_filter(r, in);
    }

    cctx = ngx_http_get_module_ctx(r, ngx_http_sbx_connector_module);

    if (cctx == NULL) {
        return ngx_http_next_body_filter(r, in);
    }

    switch (cctx->rs_state) {

    case NGX_HTTP_SBX_RS_NONE:
    case NGX_HTTP_SBX_RS_OWN:
        return ngx_http_next_body_filter(r, in);

    case NGX_HTTP_SBX_RS_BUFFERING:
    case NGX_HTTP_SBX_RS_OVERFLOW:

        last = 0;

        for (cl = in; cl; cl = cl->next) {

            if (cl->buf->last_buf) {
                last = 1;
            }

            if (cctx->rs_state == NGX_HTTP_SBX_RS_BUFFERING
                && ngx_http_sbx_connector_keep(r, cctx, cl->buf) != NGX_OK)
            {
                return NGX_ERROR;
            }

            /* consumed: the upstream may reuse its buffers */
            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }

        if (last) {
            if (cctx->rs_state == NGX_HTTP_SBX_RS_BUFFERING) {
                cctx->rs_state = NGX_HTTP_SBX_RS_READY;
            }

            ngx_post_event(&cctx->post_ev, &ngx_posted_events);

        } else if (cctx->rs_state == NGX_HTTP_SBX_RS_OVERFLOW) {
            /* over the cap: the rest is not read (see _finish) */
            ngx_post_event(&cctx->post_ev, &ngx_posted_events);

        } else if (r->upstream && r->upstream->cleanup == NULL) {
            /*
             * the upstream module finalized without the end of the answer
             * (closed early, timed out, an error): it only flushes
             */
            cctx->rs_state = NGX_HTTP_SBX_RS_BROKEN;
            ngx_post_event(&cctx->post_ev, &ngx_posted_events);
        }

        return NGX_OK;

    case NGX_HTTP_SBX_RS_READY:
    case NGX_HTTP_SBX_RS_CALLING:
    case NGX_HTTP_SBX_RS_BROKEN:

        for (cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }

        return NGX_OK;

    default: /* NGX_HTTP_SBX_RS_DONE */

        data = 0;

        for (cl = in; cl; cl = cl->next) {
            if (ngx_buf_size(cl->buf)) {
                data = 1;
            }

            cl->buf->pos = cl->buf->last;
            cl->buf->file_pos = cl->buf->file_last;
        }

        rc = ngx_http_next_body_filter(r, NULL);

        /* the upstream still sends after the answer went out: stop it */
        return (data && rc == NGX_OK) ? NGX_ERROR : rc;
    }
}


/* copies a buffer of the upstream's answer, up to the cap */

static ngx_int_t
ngx_http_sbx_connector_keep(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx, ngx_buf_t *b)
{
    size_t        size, room, n;
    ngx_chain_t  *cl;

    if (ngx_buf_special(b)) {
        return NGX_OK;
    }

    if (!ngx_buf_in_memory(b)) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: the upstream's answer reached the response "
                      "hook in a file buffer");
        return NGX_ERROR;
    }

    size = b->last - b->pos;

    if (cctx->size + (off_t) size > (off_t) cctx->cap) {
        cctx->size += size;
        cctx->rs_state = NGX_HTTP_SBX_RS_OVERFLOW;
        return NGX_OK;
    }

    cctx->size += size;

    while (size) {
        room = cctx->tail ? (size_t) (cctx->tail->end - cctx->tail->last) : 0;

        if (room == 0) {
            n = ngx_max(size, ngx_min(NGX_HTTP_SBX_BODY_CHUNK,
                                      cctx->cap - (size_t) cctx->size + size));

            cl = ngx_alloc_chain_link(r->pool);
            if (cl == NULL) {
                return NGX_ERROR;
            }

            cl->buf = ngx_create_temp_buf(r->pool, n);
            if (cl->buf == NULL) {
                return NGX_ERROR;
            }

            cl->next = NULL;
            *cctx->last = cl;
            cctx->last = &cl->next;
            cctx->tail = cl->buf;

            room = n;
        }

        n = ngx_min(room, size);
        cctx->tail->last = ngx_cpymem(cctx->tail->last,
                                      b->last - size, n);
        size -= n;
    }

    return NGX_OK;
}


static void
ngx_http_sbx_connector_posted(ngx_event_t *ev)
{
    ngx_connection_t              *c;
    ngx_http_request_t            *r;
    ngx_http_sbx_connector_ctx_t  *cctx = ev->data;

    r = cctx->request;
    c = r->connection;

    ngx_http_set_log_request(c->log, r);

    if (cctx->rs_state == NGX_HTTP_SBX_RS_READY) {
        ngx_http_sbx_connector_response_start(r, cctx);

    } else {
        ngx_http_sbx_connector_response_finish(r, cctx);
    }

    ngx_http_run_posted_requests(c);
}


static void
ngx_http_sbx_connector_response_start(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx)
{
    ngx_int_t                        rc;
    ngx_buf_t                       *b;
    ngx_table_elt_t                  ct;
    ngx_http_sbx_ctx_t              *ctx;
    ngx_http_sbx_call_t             *call;
    ngx_http_sbx_connector_t        *c;
    ngx_http_sbx_upstream_answer_t   answer;

    c = ngx_http_sbx_connector_of(r);

    if (c == NULL) {
        goto failed;
    }

    ngx_memzero(&ct, sizeof(ngx_table_elt_t));
    ngx_str_set(&ct.key, "content-type");
    ct.value = r->headers_out.content_type;
    ct.hash = 1;

    answer.status = cctx->status;
    answer.headers = &r->headers_out.headers;
    answer.content_type = &ct;
    answer.body = cctx->body;

    if (answer.body == NULL
        && cctx->status >= NGX_HTTP_OK
        && cctx->status != NGX_HTTP_NO_CONTENT
        && cctx->status != NGX_HTTP_NOT_MODIFIED
        && r->method != NGX_HTTP_HEAD)
    {
        /* an empty body: "" rather than nil */
        b = ngx_calloc_buf(r->pool);
        if (b == NULL) {
            goto failed;
        }

        answer.body = ngx_alloc_chain_link(r->pool);
        if (answer.body == NULL) {
            goto failed;
        }

        b->memory = 1;
        answer.body->buf = b;
        answer.body->next = NULL;
    }

    call = ngx_http_sbx_call_create(r, c, SBX_HOOK_RESPONSE, &answer,
                                    ngx_http_sbx_connector_response_done);
    if (call == NULL) {
        goto failed;
    }

    ctx = ngx_http_get_module_ctx(r, ngx_http_sbx_module);
    cctx->call = call;
    cctx->finished = 0;
    cctx->rs_state = NGX_HTTP_SBX_RS_CALLING;

    cctx->starting = 1;
    rc = ngx_http_sbx_call_start(r, call);
    cctx->starting = 0;

    if (rc == NGX_ERROR) {
        goto failed;
    }

    if (rc == NGX_AGAIN && !cctx->finished) {
        ctx->waiting = 1;
        return;
    }

    ngx_http_sbx_connector_response_finish(r, cctx);
    return;

failed:

    cctx->call = NULL;
    cctx->rs_state = NGX_HTTP_SBX_RS_CALLING;

    ngx_http_sbx_connector_response_finish(r, cctx);
}


static void
ngx_http_sbx_connector_response_done(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call)
{
    ngx_connection_t              *c;
    ngx_http_sbx_connector_ctx_t  *cctx;

    c = r->connection;

    cctx = ngx_http_get_module_ctx(r, ngx_http_sbx_connector_module);

    if (cctx->starting) {
        cctx->finished = 1;
        return;
    }

    ngx_http_set_log_request(c->log, r);

    ngx_http_sbx_connector_response_finish(r, cctx);

    ngx_http_run_posted_requests(c);
}


/*
 * Drops the upstream's header before the module answers in its place, but
 * keeps the rate limiter's fields: "on every answer" (DESIGN.md section 6).
 */

static void
ngx_http_sbx_connector_clean_header(ngx_http_request_t *r)
{
    ngx_uint_t        i, n;
    ngx_list_part_t  *part;
    ngx_table_elt_t  *h, *nh, saved[NGX_HTTP_SBX_KEEP_HEADERS];

    n = 0;
    part = &r->headers_out.headers.part;
    h = part->elts;

    for (i = 0; /* void */ ; i++) {

        if (i >= part->nelts) {
            if (part->next == NULL) {
                break;
            }

            part = part->next;
            h = part->elts;
            i = 0;
        }

        if (h[i].hash == 0 || n == NGX_HTTP_SBX_KEEP_HEADERS) {
            continue;
        }

        if ((h[i].key.len == sizeof("RateLimit") - 1
             && ngx_strncasecmp(h[i].key.data, (u_char *) "RateLimit",
                                h[i].key.len) == 0)
            || (h[i].key.len == sizeof("RateLimit-Policy") - 1
                && ngx_strncasecmp(h[i].key.data,
                                   (u_char *) "RateLimit-Policy",
                                   h[i].key.len) == 0))
        {
            saved[n++] = h[i];
        }
    }

    ngx_http_clean_header(r);

    for (i = 0; i < n; i++) {
        nh = ngx_list_push(&r->headers_out.headers);
        if (nh == NULL) {
            return;
        }

        *nh = saved[i];
    }
}


/*
 * Sends the answer: the script's response, the upstream's answer as it was
 * (a script without the hook after all) or an error.  The request waits in
 * ngx_http_writer() until then (r->buffered); this finalizes it.
 */

static void
ngx_http_sbx_connector_response_finish(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx)
{
    sbx_rd_t                   rd;
    ngx_int_t                  rc;
    ngx_http_upstream_t       *u;
    ngx_http_sbx_call_t       *call = cctx->call;
    ngx_http_sbx_connector_t  *c;

    r->buffered &= ~NGX_HTTP_SBX_BUFFERED;

    if (cctx->rs_state == NGX_HTTP_SBX_RS_OVERFLOW) {
        c = ngx_http_sbx_connector_of(r);

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the upstream's answer "
                      "(%O bytes or more) exceeds sbx_response_buffer %uz",
                      c ? &c->name : &r->uri, cctx->size, cctx->cap);

        u = r->upstream;

        if (u && u->cleanup) {
            /*
             * the upstream is still sending: close it rather than read
             * an answer nobody will see.  Its cleanup finalizes the
             * request once (NGX_DONE); a reference keeps it for the 502.
             */
            r->main->count++;
            (*u->cleanup)(r);
        }

        cctx->rs_state = NGX_HTTP_SBX_RS_OWN;
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                     NGX_HTTP_SBX_TRANSFORM_ERROR, 0);
        goto done;
    }

    if (cctx->rs_state == NGX_HTTP_SBX_RS_BROKEN) {
        c = ngx_http_sbx_connector_of(r);

        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the upstream's answer broke "
                      "off after %O bytes; the response hook does not run",
                      c ? &c->name : &r->uri, cctx->size);

        cctx->rs_state = NGX_HTTP_SBX_RS_OWN;
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                     NGX_HTTP_SBX_TRANSFORM_ERROR, 0);
        goto done;
    }

    cctx->rs_state = NGX_HTTP_SBX_RS_OWN;

    if (call == NULL) {
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                     NGX_HTTP_SBX_TRANSFORM_ERROR, 0);
        goto done;
    }

    if (call->outcome != SBX_OUT_RESPONSE || call->result == NULL) {
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_call_fail(r, call, "response");
        goto done;
    }

    if (ngx_http_sbx_ipc_result(r, call, &rd) != NGX_OK) {
        call->outcome = 0;
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_call_fail(r, call, "response");
        goto done;
    }

    switch (call->outcome) {

    case SBX_OUT_RESPONSE:
        ngx_http_sbx_connector_clean_header(r);
        r->err_status = 0;
        r->allow_ranges = 0;
        rc = ngx_http_sbx_content_send(r, call, &rd);
        break;

    case SBX_OUT_NOHOOK:
        rc = ngx_http_sbx_connector_pass(r, cctx);
        break;

    case SBX_OUT_REQUEST:
        call->outcome = SBX_OUT_BAD_RETURN;
        ngx_str_set(&call->message, "the response hook returned a request");
        /* fall through */

    default:
        ngx_http_sbx_connector_clean_header(r);
        rc = ngx_http_sbx_call_fail(r, call, "response");
    }

done:

    cctx->rs_state = NGX_HTTP_SBX_RS_DONE;

    ngx_http_finalize_request(r, rc);
}


/* the upstream's answer as it came */

static ngx_int_t
ngx_http_sbx_connector_pass(ngx_http_request_t *r,
    ngx_http_sbx_connector_ctx_t *cctx)
{
    ngx_int_t  rc;

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    if (cctx->body == NULL) {
        return ngx_http_send_special(r, NGX_HTTP_LAST);
    }

    cctx->tail->last_buf = 1;
    cctx->tail->last_in_chain = 1;

    return ngx_http_output_filter(r, cctx->body);
}


/* ---- configuration ---- */

static void *
ngx_http_sbx_connector_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_connector_loc_conf_t  *conf;

    conf = ngx_palloc(cf->pool, sizeof(ngx_http_sbx_connector_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->response_buffer = NGX_CONF_UNSET_SIZE;

    return conf;
}


static char *
ngx_http_sbx_connector_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_sbx_connector_loc_conf_t *prev = parent;
    ngx_http_sbx_connector_loc_conf_t *conf = child;

    ngx_conf_merge_size_value(conf->response_buffer, prev->response_buffer,
                              NGX_HTTP_SBX_RESPONSE_BUFFER);

    if (conf->response_buffer > SBX_FRAME_MAX / 2) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_response_buffer\" must be at most %uz",
                           (size_t) SBX_FRAME_MAX / 2);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sbx_connector_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PRECONTENT_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_connector_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_sbx_connector_header_filter;

    ngx_http_next_body_filter = ngx_http_top_body_filter;
    ngx_http_top_body_filter = ngx_http_sbx_connector_body_filter;

    return NGX_OK;
}
