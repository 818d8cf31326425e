/*
 * ngx_http_sbx_response.c: the per-request context shared by the sbx
 * modules, decisions, and the contract's error answers (DESIGN.md
 * section 6): {"error":"<code>","request_id":"<id>"} as application/json.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"


const ngx_str_t  ngx_http_sbx_decision_names[] = {
    ngx_string("allowed"),
    ngx_string("residency_denied"),
    ngx_string("rate_limited"),
    ngx_string("retired"),
    ngx_string("transform_error"),
    ngx_string("transform_timeout"),
    ngx_string("overloaded"),
    ngx_string("sandbox_failure"),
    ngx_string("ratelimit_unavailable"),
};


/* error codes in bodies: as decisions, except retired */
static const ngx_str_t  ngx_http_sbx_error_codes[] = {
    ngx_null_string,
    ngx_string("residency_denied"),
    ngx_string("rate_limited"),
    ngx_string("connector_retired"),
    ngx_string("transform_error"),
    ngx_string("transform_timeout"),
    ngx_string("overloaded"),
    ngx_string("sandbox_failure"),
    ngx_string("ratelimit_unavailable"),
};


ngx_http_sbx_ctx_t *
ngx_http_sbx_get_ctx(ngx_http_request_t *r)
{
    ngx_http_sbx_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_sbx_module);
    if (ctx) {
        return ctx;
    }

    ctx = ngx_pcalloc(r->main->pool, sizeof(ngx_http_sbx_ctx_t));
    if (ctx == NULL) {
        return NULL;
    }

    ctx->ratelimit_remaining = -1;

    ngx_http_set_ctx(r->main, ctx, ngx_http_sbx_module);

    return ctx;
}


/* the request's $request_id, the id of audit lines and error bodies */

void
ngx_http_sbx_request_id(ngx_http_request_t *r, ngx_str_t *id)
{
    ngx_http_variable_value_t  *v;
    ngx_http_sbx_main_conf_t   *smcf;

    smcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_module);

    v = ngx_http_get_indexed_variable(r->main, smcf->request_id_index);

    if (v == NULL || v->not_found) {
        ngx_str_null(id);
        return;
    }

    id->data = v->data;
    id->len = v->len;
}


void
ngx_http_sbx_set_decision(ngx_http_request_t *r,
    ngx_http_sbx_decision_e decision)
{
    ngx_http_sbx_ctx_t  *ctx;

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return;
    }

    ctx->decision = decision;
    ctx->decided = 1;
}


ngx_int_t
ngx_http_sbx_send_error(ngx_http_request_t *r, ngx_uint_t status,
    ngx_http_sbx_decision_e decision, time_t retry_after)
{
    size_t            len;
    ngx_int_t         rc;
    ngx_buf_t        *b;
    ngx_str_t        *code;
    ngx_chain_t       out;
    ngx_table_elt_t  *h;
    ngx_str_t         id;

    ngx_http_sbx_request_id(r, &id);
    ngx_http_sbx_set_decision(r, decision);

    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }

    code = (ngx_str_t *) &ngx_http_sbx_error_codes[decision];

    len = sizeof("{\"error\":\"\",\"request_id\":\"\"}") - 1
          + code->len + id.len;

    b = ngx_create_temp_buf(r->pool, len);
    if (b == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    b->last = ngx_sprintf(b->last, "{\"error\":\"%V\",\"request_id\":\"",
                          code);
    b->last = ngx_cpymem(b->last, id.data, id.len);
    b->last = ngx_cpymem(b->last, "\"}", 2);
    b->last_buf = (r == r->main) ? 1 : 0;
    b->last_in_chain = 1;

    if (ngx_http_sbx_rl_policy_header(r) != NGX_OK) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    if (retry_after > 0) {
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Retry-After");
        h->value.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN);
        if (h->value.data == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        h->value.len = ngx_sprintf(h->value.data, "%T", retry_after)
                       - h->value.data;
    }

    r->headers_out.status = status;
    r->headers_out.content_length_n = b->last - b->pos;
    ngx_str_set(&r->headers_out.content_type, "application/json");
    r->headers_out.content_type_len = r->headers_out.content_type.len;
    r->headers_out.content_type_lowcase = NULL;

    /* the body is ours, not an error page */
    r->err_status = 0;

    if (r->method == NGX_HTTP_HEAD) {
        r->header_only = 1;
    }

    rc = ngx_http_send_header(r);

    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only) {
        return rc;
    }

    out.buf = b;
    out.next = NULL;

    return ngx_http_output_filter(r, &out);
}
