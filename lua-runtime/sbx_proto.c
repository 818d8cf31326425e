/*
 * sbx_proto.c: frame and payload codec shared by the nginx module and the
 * helper.  No allocation here: callers own every buffer.
 */

#include <string.h>

#include "sbx_proto.h"


void
sbx_frame_hdr_write(uint8_t *p, uint32_t len, uint16_t type, uint16_t flags,
    uint32_t id, uint32_t aux)
{
    sbx_frame_hdr_t  h;

    h.len = len;
    h.type = type;
    h.flags = flags;
    h.id = id;
    h.aux = aux;

    memcpy(p, &h, SBX_FRAME_HDR_SIZE);
}


void
sbx_frame_hdr_read(const uint8_t *p, sbx_frame_hdr_t *h)
{
    memcpy(h, p, SBX_FRAME_HDR_SIZE);
}


int
sbx_frame_hdr_check(const sbx_frame_hdr_t *h, uint32_t max)
{
    if (h->type < SBX_MSG_INIT || h->type > SBX_MSG_RESULT) {
        return -1;
    }

    if (h->len > max || h->len > SBX_FRAME_MAX) {
        return -1;
    }

    return 0;
}


void
sbx_wr_init(sbx_wr_t *w, uint8_t *buf, size_t size)
{
    w->start = buf;
    w->pos = buf;
    w->end = buf ? buf + size : NULL;
    w->need = 0;
    w->overflow = 0;
}


static void
sbx_put(sbx_wr_t *w, const void *data, size_t len)
{
    w->need += len;

    if (w->start == NULL) {
        return;
    }

    if ((size_t) (w->end - w->pos) < len) {
        w->overflow = 1;
        w->pos = w->end;
        return;
    }

    if (len) {
        memcpy(w->pos, data, len);
        w->pos += len;
    }
}


void
sbx_put_u8(sbx_wr_t *w, uint8_t v)
{
    sbx_put(w, &v, 1);
}


void
sbx_put_u32(sbx_wr_t *w, uint32_t v)
{
    sbx_put(w, &v, 4);
}


void
sbx_put_u64(sbx_wr_t *w, uint64_t v)
{
    sbx_put(w, &v, 8);
}


void
sbx_put_str(sbx_wr_t *w, const void *data, size_t len)
{
    if (len > UINT32_MAX) {
        w->overflow = 1;
        return;
    }

    sbx_put_u32(w, (uint32_t) len);
    sbx_put(w, data, len);
}


void
sbx_rd_init(sbx_rd_t *r, const uint8_t *buf, size_t len)
{
    r->pos = buf;
    r->end = buf + len;
    r->err = 0;
}


static int
sbx_get(sbx_rd_t *r, void *v, size_t len)
{
    if (r->err || (size_t) (r->end - r->pos) < len) {
        r->err = 1;
        return -1;
    }

    memcpy(v, r->pos, len);
    r->pos += len;

    return 0;
}


int
sbx_get_u8(sbx_rd_t *r, uint8_t *v)
{
    return sbx_get(r, v, 1);
}


int
sbx_get_u32(sbx_rd_t *r, uint32_t *v)
{
    return sbx_get(r, v, 4);
}


int
sbx_get_u64(sbx_rd_t *r, uint64_t *v)
{
    return sbx_get(r, v, 8);
}


int
sbx_get_str(sbx_rd_t *r, sbx_str_t *s)
{
    uint32_t  len;

    if (sbx_get_u32(r, &len) != 0) {
        return -1;
    }

    if ((size_t) (r->end - r->pos) < len) {
        r->err = 1;
        return -1;
    }

    s->data = r->pos;
    s->len = len;
    r->pos += len;

    return 0;
}


/*
 * Reads an item count and checks it against both a hard maximum and the
 * bytes left (each item takes at least min_item bytes), so a hostile count
 * never drives an allocation.
 */

int
sbx_get_count(sbx_rd_t *r, uint32_t *n, uint32_t max, size_t min_item)
{
    if (sbx_get_u32(r, n) != 0) {
        return -1;
    }

    if (*n > max
        || (min_item && (size_t) (r->end - r->pos) / min_item < *n))
    {
        r->err = 1;
        return -1;
    }

    return 0;
}


/* RFC 9110 token characters */

int
sbx_header_name_valid(const uint8_t *p, size_t len)
{
    size_t  i;

    if (len == 0 || len > SBX_MAX_HEADER_NAME) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if ((p[i] >= 'a' && p[i] <= 'z') || (p[i] >= 'A' && p[i] <= 'Z')
            || (p[i] >= '0' && p[i] <= '9'))
        {
            continue;
        }

        if (strchr("!#$%&'*+-.^_`|~", p[i]) == NULL || p[i] == '\0') {
            return 0;
        }
    }

    return 1;
}


/* field-value: visible characters, space and tab; no CR, LF, NUL, DEL */

int
sbx_header_value_valid(const uint8_t *p, size_t len)
{
    size_t  i;

    if (len > SBX_MAX_HEADER_VALUE) {
        return 0;
    }

    for (i = 0; i < len; i++) {
        if ((p[i] < 0x20 && p[i] != '\t') || p[i] == 0x7f) {
            return 0;
        }
    }

    return 1;
}


const char *
sbx_outcome_name(unsigned outcome)
{
    switch (outcome) {
    case SBX_OUT_RESPONSE:
        return "response";
    case SBX_OUT_REQUEST:
        return "request";
    case SBX_OUT_NOHOOK:
        return "no hook";
    case SBX_OUT_SCRIPT_ERROR:
        return "script error";
    case SBX_OUT_BAD_RETURN:
        return "invalid return value";
    case SBX_OUT_INSTRUCTIONS:
        return "instruction limit";
    case SBX_OUT_MEMORY:
        return "memory limit";
    case SBX_OUT_TIMEOUT:
        return "timeout";
    default:
        return "unknown";
    }
}
