/*
 * ngx_http_sbx_content.c: content mode.  A location with
 * "sbx_connector NAME;" and no other content handler answers with what the
 * connector's request hook returns: the client body is read, the request
 * goes to a helper of the connector's pool, and the RESULT becomes the
 * response (or one of the error answers of DESIGN.md section 6).
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"


static void ngx_http_sbx_content_body(ngx_http_request_t *r);
static void ngx_http_sbx_content_done(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);
static ngx_int_t ngx_http_sbx_content_outcome(ngx_http_request_t *r,
    ngx_http_sbx_call_t *call);


static ngx_str_t  ngx_http_sbx_hop_by_hop[] = {
    ngx_string("connection"),
    ngx_string("keep-alive"),
    ngx_string("proxy-connection"),
    ngx_string("te"),
    ngx_string("trailer"),
    ngx_string("transfer-encoding"),
    ngx_string("upgrade"),
    ngx_string("content-length"),
    ngx_string("date"),                 /* nginx sends its own, once */
    ngx_string("server"),
    ngx_string("ratelimit"),            /* the gateway's own fields */
    ngx_string("ratelimit-policy"),
    ngx_null_string
};


ngx_int_t
ngx_http_sbx_content_handler(ngx_http_request_t *r)
{
    ngx_int_t                 rc;
    ngx_http_sbx_ctx_t       *ctx;
    ngx_http_sbx_loc_conf_t  *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);

    if (slcf->connector == NULL) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    /* the whole body goes to the script, so keep it in memory if it fits */
    r->request_body_in_single_buf = 1;

    rc = ngx_http_read_client_request_body(r, ngx_http_sbx_content_body);

    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }

    return NGX_DONE;
}


static void
ngx_http_sbx_content_body(ngx_http_request_t *r)
{
    ngx_int_t                  rc;
    ngx_http_sbx_ctx_t        *ctx;
    ngx_http_sbx_call_t       *call;
    ngx_http_sbx_connector_t  *c;
    ngx_http_sbx_loc_conf_t   *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);
    c = slcf->connector;

    call = ngx_http_sbx_call_create(r, c, SBX_HOOK_REQUEST, NULL,
                                    ngx_http_sbx_content_done);
    if (call == NULL) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    rc = ngx_http_sbx_call_start(r, call);

    if (rc == NGX_AGAIN) {
        ctx = ngx_http_get_module_ctx(r, ngx_http_sbx_module);
        ctx->waiting = 1;

        /*
         * a client that closes its connection ends the request (499) and
         * so cancels the call: a queued one never runs, a running one's
         * answer is dropped (as proxy_pass does with its upstream)
         */
        r->read_event_handler = ngx_http_test_reading;
        return;
    }

    if (rc == NGX_ERROR) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }

    ngx_http_finalize_request(r, ngx_http_sbx_call_fail(r, call, "request"));
}


static void
ngx_http_sbx_content_done(ngx_http_request_t *r, ngx_http_sbx_call_t *call)
{
    ngx_connection_t  *c;

    c = r->connection;

    ngx_http_finalize_request(r, ngx_http_sbx_content_outcome(r, call));

    ngx_http_run_posted_requests(c);
}


/*
 * Maps a call that produced no usable result to the answers of DESIGN.md
 * section 6: the pool's failures, a malformed RESULT, script errors and
 * limits.  The RESULT, when there is one, has been read already.
 */

ngx_int_t
ngx_http_sbx_call_fail(ngx_http_request_t *r, ngx_http_sbx_call_t *call,
    const char *hook)
{
    u_char                    *p, text[SBX_MAX_ERROR_MSG * 4];
    ngx_str_t                  id;
    ngx_uint_t                 status;
    ngx_http_sbx_decision_e    decision;
    ngx_http_sbx_connector_t  *c = call->connector;

    switch (call->outcome) {

    case NGX_HTTP_SBX_CALL_OVERLOADED:
        ngx_log_error(NGX_LOG_WARN, r->connection->log, 0,
                      "sbx: connector \"%V\": pool \"%V\" is overloaded",
                      &c->name, &c->pool->name);
        return ngx_http_sbx_send_error(r, NGX_HTTP_SERVICE_UNAVAILABLE,
                                       NGX_HTTP_SBX_OVERLOADED, 1);

    case NGX_HTTP_SBX_CALL_KILLED:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the helper did not stop the "
                      "%s hook at its %Mms deadline and was killed",
                      &c->name, hook, c->timeout);
        return ngx_http_sbx_send_error(r, NGX_HTTP_GATEWAY_TIME_OUT,
                                       NGX_HTTP_SBX_TRANSFORM_TIMEOUT, 0);

    case NGX_HTTP_SBX_CALL_UNAVAILABLE:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": no helper of pool \"%V\" is "
                      "running, not running the %s hook", &c->name,
                      &c->pool->name, hook);
        return ngx_http_sbx_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                       NGX_HTTP_SBX_SANDBOX_FAILURE, 0);

    case NGX_HTTP_SBX_CALL_DIED:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the helper died while "
                      "running the %s hook", &c->name, hook);
        return ngx_http_sbx_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                       NGX_HTTP_SBX_SANDBOX_FAILURE, 0);

    case SBX_OUT_SCRIPT_ERROR:
    case SBX_OUT_BAD_RETURN:
    case SBX_OUT_INSTRUCTIONS:
    case SBX_OUT_MEMORY:
        status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        decision = NGX_HTTP_SBX_TRANSFORM_ERROR;
        break;

    case SBX_OUT_TIMEOUT:
        status = NGX_HTTP_GATEWAY_TIME_OUT;
        decision = NGX_HTTP_SBX_TRANSFORM_TIMEOUT;
        break;

    default:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": malformed RESULT of the %s "
                      "hook from helper %i", &c->name, hook,
                      call->helper_pid);
        return ngx_http_sbx_send_error(r, NGX_HTTP_BAD_GATEWAY,
                                       NGX_HTTP_SBX_SANDBOX_FAILURE, 0);
    }

    p = ngx_http_sbx_ipc_escape(text, text + sizeof(text),
                                call->message.data, call->message.len);

    ngx_http_sbx_request_id(r, &id);

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "sbx: connector \"%V\" request %V: %s hook: %s: %*s "
                  "(instructions: %uL, memory peak: %uL bytes, time: %uD us)",
                  &c->name, &id, hook, sbx_outcome_name(call->outcome),
                  p - text, text, call->instructions, call->memory_peak,
                  call->time_us);

    return ngx_http_sbx_send_error(r, status, decision, 0);
}


static ngx_int_t
ngx_http_sbx_content_outcome(ngx_http_request_t *r, ngx_http_sbx_call_t *call)
{
    sbx_rd_t                   rd;
    ngx_http_sbx_connector_t  *c = call->connector;

    if (call->outcome != SBX_OUT_RESPONSE || call->result == NULL) {
        return ngx_http_sbx_call_fail(r, call, "request");
    }

    if (ngx_http_sbx_ipc_result(r, call, &rd) != NGX_OK) {
        call->outcome = 0;
        return ngx_http_sbx_call_fail(r, call, "request");
    }

    switch (call->outcome) {

    case SBX_OUT_RESPONSE:
        return ngx_http_sbx_content_send(r, call, &rd);

    case SBX_OUT_REQUEST:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the request hook returned a "
                      "request, but the location has no upstream; return "
                      "{status=, headers=, body=} in content mode",
                      &c->name);
        return ngx_http_sbx_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                       NGX_HTTP_SBX_TRANSFORM_ERROR, 0);

    case SBX_OUT_NOHOOK:
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the script has no request "
                      "hook", &c->name);
        return ngx_http_sbx_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                       NGX_HTTP_SBX_TRANSFORM_ERROR, 0);

    default:
        return ngx_http_sbx_call_fail(r, call, "request");
    }
}


/*
 * Headers that nginx's own filters read through r->headers_out rather than
 * the list: without the pointer, gzip compresses an answer the script
 * says is encoded already, expires adds a second Cache-Control, and
 * not_modified never sees the ETag or Last-Modified.  Set as nginx's
 * upstream module sets them for a proxied answer.
 */

static ngx_int_t
ngx_http_sbx_known_header(ngx_http_request_t *r, ngx_table_elt_t *h)
{
    ngx_table_elt_t  **ph;

#define ngx_http_sbx_named(s)                                                \
    (h->key.len == sizeof(s) - 1                                              \
     && ngx_strncasecmp(h->key.data, (u_char *) s, sizeof(s) - 1) == 0)

    if (ngx_http_sbx_named("content-encoding")) {
        r->headers_out.content_encoding = h;

    } else if (ngx_http_sbx_named("cache-control")) {

#if (nginx_version >= 1023000)
        for (ph = &r->headers_out.cache_control; *ph; ph = &(*ph)->next) {
            /* void */
        }

        h->next = NULL;
        *ph = h;
#else
        if (r->headers_out.cache_control.elts == NULL
            && ngx_array_init(&r->headers_out.cache_control, r->pool, 1,
                              sizeof(ngx_table_elt_t *))
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        ph = ngx_array_push(&r->headers_out.cache_control);
        if (ph == NULL) {
            return NGX_ERROR;
        }

        *ph = h;
#endif

    } else if (ngx_http_sbx_named("expires")) {
        r->headers_out.expires = h;

    } else if (ngx_http_sbx_named("etag")) {
        r->headers_out.etag = h;

    } else if (ngx_http_sbx_named("last-modified")) {
        r->headers_out.last_modified = h;
        r->headers_out.last_modified_time =
                              ngx_parse_http_time(h->value.data, h->value.len);

    } else if (ngx_http_sbx_named("location")) {
        r->headers_out.location = h;

    } else if (ngx_http_sbx_named("www-authenticate")) {
        r->headers_out.www_authenticate = h;

    } else if (ngx_http_sbx_named("accept-ranges")) {
        r->headers_out.accept_ranges = h;

    } else if (ngx_http_sbx_named("refresh")) {
        r->headers_out.refresh = h;
    }

#undef ngx_http_sbx_named

    return NGX_OK;
}


/*
 * Reads status, headers and body of a response table and sends it.  The
 * helper validated all of it; the worker checks again and answers 500 on
 * anything it would not put on the wire.  Connector mode sends short-circuit
 * and response-hook answers with it too.
 */

ngx_int_t
ngx_http_sbx_content_send(ngx_http_request_t *r, ngx_http_sbx_call_t *call,
    sbx_rd_t *rd)
{
    sbx_rd_t           hdrs;
    uint8_t            has_body;
    uint32_t           status, i, n;
    sbx_str_t          body;
    ngx_int_t          rc;
    ngx_buf_t         *b;
    ngx_uint_t         k, skip;
    ngx_chain_t        out;
    sbx_header_t       hd;
    ngx_table_elt_t   *h;

    if (sbx_get_u32(rd, &status) != 0
        || status < 200 || status > 599
        || sbx_get_count(rd, &n, SBX_MAX_HEADERS, 8) != 0)
    {
        goto invalid;
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
            goto invalid;
        }
    }

    body.data = NULL;
    body.len = 0;

    if (sbx_get_u8(rd, &has_body) != 0 || sbx_get_str(rd, &body) != 0)
    {
        goto invalid;
    }

    if (status == NGX_HTTP_NO_CONTENT
        || status == NGX_HTTP_NOT_MODIFIED)
    {
        body.len = 0;
    }

    for (i = 0; i < n; i++) {
        (void) sbx_get_str(&hdrs, &hd.name);
        (void) sbx_get_str(&hdrs, &hd.value);

        if (hd.name.len == sizeof("content-type") - 1
            && ngx_strncasecmp((u_char *) hd.name.data,
                               (u_char *) "content-type",
                               hd.name.len) == 0)
        {
            r->headers_out.content_type.data = (u_char *) hd.value.data;
            r->headers_out.content_type.len = hd.value.len;
            r->headers_out.content_type_len = hd.value.len;
            r->headers_out.content_type_lowcase = NULL;
            continue;
        }

        skip = 0;

        for (k = 0; ngx_http_sbx_hop_by_hop[k].len; k++) {
            if (hd.name.len == ngx_http_sbx_hop_by_hop[k].len
                && ngx_strncasecmp((u_char *) hd.name.data,
                                   ngx_http_sbx_hop_by_hop[k].data,
                                   hd.name.len) == 0)
            {
                skip = 1;
                break;
            }
        }

        if (skip) {
            continue;
        }

        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        h->key.data = (u_char *) hd.name.data;
        h->key.len = hd.name.len;
        h->value.data = (u_char *) hd.value.data;
        h->value.len = hd.value.len;
        h->lowcase_key = NULL;
#if (nginx_version >= 1023000)
        h->next = NULL;
#endif

        if (ngx_http_sbx_known_header(r, h) != NGX_OK) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    ngx_http_sbx_set_decision(r, NGX_HTTP_SBX_ALLOWED);

    r->headers_out.status = status;

    /*
     * No Content-Length where the answer has no body to measure: 204 and
     * 304 (RFC 9110 8.6), and a HEAD whose hook gave no body (the length
     * of the GET answer is not known; 0 would be wrong).
     */
    if (status == NGX_HTTP_NO_CONTENT || status == NGX_HTTP_NOT_MODIFIED
        || (r->method == NGX_HTTP_HEAD && !has_body))
    {
        r->headers_out.content_length_n = -1;

    } else {
        r->headers_out.content_length_n = body.len;
    }

    if (r->headers_out.content_type.len == 0 && body.len) {
        ngx_str_set(&r->headers_out.content_type, "text/plain");
        r->headers_out.content_type_len = r->headers_out.content_type.len;
    }

    if (r->method == NGX_HTTP_HEAD || body.len == 0) {
        r->header_only = 1;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    b = ngx_calloc_buf(r->pool);
    if (b == NULL) {
        return NGX_ERROR;
    }

    /* the body stays in the RESULT frame: no copy */
    b->pos = (u_char *) body.data;
    b->last = (u_char *) body.data + body.len;
    b->memory = 1;
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);

invalid:

    ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                  "sbx: connector \"%V\": invalid response from helper %i",
                  &call->connector->name, call->helper_pid);

    return ngx_http_sbx_send_error(r, NGX_HTTP_INTERNAL_SERVER_ERROR,
                                   NGX_HTTP_SBX_TRANSFORM_ERROR, 0);
}
