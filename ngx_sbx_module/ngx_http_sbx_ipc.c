/*
 * ngx_http_sbx_ipc.c: the request side of the helper protocol.  Builds the
 * CALL frame a hook runs on (req, and res for the response hook) and reads
 * the common part of a RESULT: usage figures, the script's log lines and
 * the error message.  Layouts: lua-runtime/sbx_proto.h.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"


static void ngx_http_sbx_ipc_put_ngx(sbx_wr_t *w, ngx_str_t *s);
static void ngx_http_sbx_ipc_put_headers(sbx_wr_t *w, ngx_list_t *list,
    ngx_table_elt_t *extra);
static ngx_int_t ngx_http_sbx_ipc_put_body(ngx_http_request_t *r,
    sbx_wr_t *w, ngx_chain_t *in, off_t len);
static off_t ngx_http_sbx_ipc_body_len(ngx_chain_t *in);
static ngx_int_t ngx_http_sbx_ipc_write(ngx_http_request_t *r, sbx_wr_t *w,
    ngx_http_sbx_connector_t *c, ngx_uint_t hook, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_upstream_answer_t *res);


static void
ngx_http_sbx_ipc_put_ngx(sbx_wr_t *w, ngx_str_t *s)
{
    sbx_put_str(w, s->data, s->len);
}


/*
 * Headers go with lower-case names, in arrival order, at most
 * SBX_MAX_HEADERS; names or values the helper would refuse are left out
 * (nginx has already refused most of them).
 */

static void
ngx_http_sbx_ipc_put_headers(sbx_wr_t *w, ngx_list_t *list,
    ngx_table_elt_t *extra)
{
    u_char            *lc, name[SBX_MAX_HEADER_NAME];
    uint32_t           n;
    ngx_uint_t         i, pass;
    ngx_list_part_t   *part;
    ngx_table_elt_t   *h;

    n = 0;

    for (pass = 0; pass < 2; pass++) {

        if (pass == 1) {
            sbx_put_u32(w, n);
            n = 0;
        }

        if (extra && extra->hash && extra->value.len) {
            if (pass == 1) {
                sbx_put_str(w, extra->key.data, extra->key.len);
                ngx_http_sbx_ipc_put_ngx(w, &extra->value);
            }

            n++;
        }

        part = &list->part;
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

            if (h[i].hash == 0
                || h[i].key.len == 0
                || h[i].key.len > SBX_MAX_HEADER_NAME
                || h[i].value.len > SBX_MAX_HEADER_VALUE
                || !sbx_header_name_valid(h[i].key.data, h[i].key.len)
                || !sbx_header_value_valid(h[i].value.data, h[i].value.len))
            {
                continue;
            }

            if (n == SBX_MAX_HEADERS) {
                break;
            }

            if (pass == 1) {
                lc = name;
                ngx_strlow(lc, h[i].key.data, h[i].key.len);
                sbx_put_str(w, lc, h[i].key.len);
                ngx_http_sbx_ipc_put_ngx(w, &h[i].value);
            }

            n++;
        }
    }
}


static off_t
ngx_http_sbx_ipc_body_len(ngx_chain_t *in)
{
    off_t  len;

    len = 0;

    for ( /* void */ ; in; in = in->next) {
        len += ngx_buf_size(in->buf);
    }

    return len;
}


/* the body may be partly in memory and partly in a temporary file */

static ngx_int_t
ngx_http_sbx_ipc_put_body(ngx_http_request_t *r, sbx_wr_t *w,
    ngx_chain_t *in, off_t len)
{
    size_t      size;
    ssize_t     n;
    ngx_buf_t  *b;

    sbx_put_u8(w, 1);
    sbx_put_u32(w, (uint32_t) len);

    if (w->start == NULL) {
        w->need += (size_t) len;
        return NGX_OK;
    }

    if ((off_t) (w->end - w->pos) < len) {
        w->overflow = 1;
        return NGX_ERROR;
    }

    for ( /* void */ ; in; in = in->next) {
        b = in->buf;

        if (ngx_buf_in_memory(b)) {
            size = b->last - b->pos;

            /* an empty buffer may have no memory at all (pos NULL) */
            if (size) {
                w->pos = ngx_cpymem(w->pos, b->pos, size);
                w->need += size;
            }

            continue;
        }

        if (b->in_file) {
            size = (size_t) (b->file_last - b->file_pos);

            n = ngx_read_file(b->file, w->pos, size, b->file_pos);

            if (n != (ssize_t) size) {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "sbx: could not read the buffered request "
                              "body from \"%V\"", &b->file->name);
                return NGX_ERROR;
            }

            w->pos += size;
            w->need += size;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_ipc_write(ngx_http_request_t *r, sbx_wr_t *w,
    ngx_http_sbx_connector_t *c, ngx_uint_t hook, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_upstream_answer_t *res)
{
    off_t       len;
    ngx_str_t   id;

    ngx_http_sbx_request_id(r, &id);

    ngx_http_sbx_ipc_put_ngx(w, &r->method_name);
    ngx_http_sbx_ipc_put_ngx(w, &r->uri);
    ngx_http_sbx_ipc_put_ngx(w, &r->args);
    ngx_http_sbx_ipc_put_ngx(w, &id);
    ngx_http_sbx_ipc_put_ngx(w, &r->connection->addr_text);
    ngx_http_sbx_ipc_put_ngx(w, &ctx->country);
    ngx_http_sbx_ipc_put_ngx(w, &ctx->continent);

    ngx_http_sbx_ipc_put_headers(w, &r->headers_in.headers, NULL);

    if (r->request_body && r->request_body->bufs) {
        len = ngx_http_sbx_ipc_body_len(r->request_body->bufs);

        if (ngx_http_sbx_ipc_put_body(r, w, r->request_body->bufs, len)
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    } else if (r->headers_in.content_length_n > 0 || r->headers_in.chunked) {
        /* a body was announced and read, all of it empty */
        sbx_put_u8(w, 1);
        sbx_put_str(w, NULL, 0);

    } else {
        sbx_put_u8(w, 0);
        sbx_put_str(w, NULL, 0);
    }

    if (hook != SBX_HOOK_RESPONSE) {
        return w->overflow ? NGX_ERROR : NGX_OK;
    }

    sbx_put_u32(w, (uint32_t) res->status);
    ngx_http_sbx_ipc_put_headers(w, res->headers, res->content_type);

    if (res->body) {
        if (ngx_http_sbx_ipc_put_body(r, w, res->body,
                                      ngx_http_sbx_ipc_body_len(res->body))
            != NGX_OK)
        {
            return NGX_ERROR;
        }

    } else {
        sbx_put_u8(w, 0);
        sbx_put_str(w, NULL, 0);
    }

    return w->overflow ? NGX_ERROR : NGX_OK;
}


ngx_http_sbx_call_t *
ngx_http_sbx_call_create(ngx_http_request_t *r, ngx_http_sbx_connector_t *c,
    ngx_uint_t hook, ngx_http_sbx_upstream_answer_t *res,
    ngx_http_sbx_call_done_pt done)
{
    ngx_http_sbx_ctx_t   *ctx;
    ngx_http_sbx_call_t  *call;

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return NULL;
    }

    /* req.client.country and .continent */
    if (ngx_http_sbx_geo_lookup(r, ctx) != NGX_OK) {
        return NULL;
    }

    call = ngx_pcalloc(r->pool, sizeof(ngx_http_sbx_call_t));
    if (call == NULL) {
        return NULL;
    }

    call->connector = c;
    call->hook = hook;
    call->done = done;

    call->out = ngx_http_sbx_ipc_request(r, c, hook, ctx, res);
    if (call->out == NULL) {
        return NULL;
    }

    ctx->call = call;

    return call;
}


/*
 * Returns a buffer holding the CALL frame: SBX_FRAME_HDR_SIZE bytes of room
 * for the header (the pool writes it) and the payload.  The frame lives in
 * the request's pool.
 */

ngx_buf_t *
ngx_http_sbx_ipc_request(ngx_http_request_t *r, ngx_http_sbx_connector_t *c,
    ngx_uint_t hook, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_upstream_answer_t *res)
{
    size_t      size;
    sbx_wr_t    w;
    ngx_buf_t  *b;

    sbx_wr_init(&w, NULL, 0);

    if (ngx_http_sbx_ipc_write(r, &w, c, hook, ctx, res) != NGX_OK) {
        return NULL;
    }

    size = w.need;

    if (size > SBX_FRAME_MAX - SBX_FRAME_HDR_SIZE) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "sbx: connector \"%V\": the request is too large "
                      "for the helper (%uz bytes)", &c->name, size);
        return NULL;
    }

    b = ngx_create_temp_buf(r->pool, SBX_FRAME_HDR_SIZE + size);
    if (b == NULL) {
        return NULL;
    }

    sbx_wr_init(&w, b->pos + SBX_FRAME_HDR_SIZE, size);

    if (ngx_http_sbx_ipc_write(r, &w, c, hook, ctx, res) != NGX_OK
        || w.need != size)
    {
        ngx_log_error(NGX_LOG_ALERT, r->connection->log, 0,
                      "sbx: connector \"%V\": CALL frame size mismatch",
                      &c->name);
        return NULL;
    }

    b->last = b->pos + SBX_FRAME_HDR_SIZE + size;

    return b;
}


/*
 * Reads the common part of call->result into call, logs the script's
 * lines and leaves rd at the outcome's own part.  NGX_ERROR: the helper
 * sent something malformed.
 */

ngx_int_t
ngx_http_sbx_ipc_result(ngx_http_request_t *r, ngx_http_sbx_call_t *call,
    sbx_rd_t *rd)
{
    uint8_t     outcome;
    uint32_t    cpu_ms;
    sbx_str_t   msg;

    sbx_rd_init(rd, call->result, call->result_len);

    if (sbx_get_u8(rd, &outcome) != 0
        || sbx_get_u64(rd, &call->instructions) != 0
        || sbx_get_u64(rd, &call->memory_peak) != 0
        || sbx_get_u32(rd, &call->time_us) != 0
        || sbx_get_u32(rd, &cpu_ms) != 0)
    {
        return NGX_ERROR;
    }

    call->outcome = outcome;

    if (ngx_http_sbx_ipc_log_lines(r, call, rd) != NGX_OK) {
        return NGX_ERROR;
    }

    switch (outcome) {

    case SBX_OUT_RESPONSE:
    case SBX_OUT_REQUEST:
    case SBX_OUT_NOHOOK:
        return NGX_OK;

    case SBX_OUT_SCRIPT_ERROR:
    case SBX_OUT_BAD_RETURN:
    case SBX_OUT_INSTRUCTIONS:
    case SBX_OUT_MEMORY:
    case SBX_OUT_TIMEOUT:
        if (sbx_get_str(rd, &msg) != 0) {
            return NGX_ERROR;
        }

        call->message.data = (u_char *) msg.data;
        call->message.len = ngx_min(msg.len, SBX_MAX_ERROR_MSG);
        return NGX_OK;

    default:
        return NGX_ERROR;
    }
}


/* a script's line, made safe for a log line: no CR/LF, no control bytes */

u_char *
ngx_http_sbx_ipc_escape(u_char *dst, u_char *last, const u_char *src,
    size_t len)
{
    static u_char  hex[] = "0123456789abcdef";

    while (len-- && dst + 4 < last) {

        if (*src < 0x20 || *src == 0x7f || *src == '\\') {
            *dst++ = '\\';

            switch (*src) {
            case '\n':
                *dst++ = 'n';
                break;
            case '\r':
                *dst++ = 'r';
                break;
            case '\t':
                *dst++ = 't';
                break;
            case '\\':
                *dst++ = '\\';
                break;
            default:
                *dst++ = 'x';
                *dst++ = hex[*src >> 4];
                *dst++ = hex[*src & 0xf];
            }

        } else {
            *dst++ = *src;
        }

        src++;
    }

    return dst;
}


ngx_int_t
ngx_http_sbx_ipc_log_lines(ngx_http_request_t *r, ngx_http_sbx_call_t *call,
    sbx_rd_t *rd)
{
    u_char      *p, text[SBX_MAX_LOG_BYTES * 2];
    uint8_t      level;
    uint32_t     i, n;
    sbx_str_t    line;
    ngx_str_t    id;
    ngx_uint_t   lv;

    /* the lines, and a notice when the helper dropped more */
    if (sbx_get_count(rd, &n, SBX_MAX_LOG_LINES + 1, 5) != 0) {
        return NGX_ERROR;
    }

    ngx_http_sbx_request_id(r, &id);

    for (i = 0; i < n; i++) {
        if (sbx_get_u8(rd, &level) != 0 || sbx_get_str(rd, &line) != 0) {
            return NGX_ERROR;
        }

        switch (level) {
        case SBX_LOG_ERR:
            lv = NGX_LOG_ERR;
            break;
        case SBX_LOG_WARN:
            lv = NGX_LOG_WARN;
            break;
        default:
            lv = NGX_LOG_INFO;
        }

        p = ngx_http_sbx_ipc_escape(text, text + sizeof(text), line.data,
                                    ngx_min(line.len, SBX_MAX_LOG_BYTES));

        ngx_log_error(lv, r->connection->log, 0,
                      "sbx: connector \"%V\" request %V: script: %*s",
                      &call->connector->name, &id, p - text, text);
    }

    return NGX_OK;
}
