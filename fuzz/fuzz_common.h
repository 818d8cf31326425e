/*
 * fuzz_common.h: shared by the libFuzzer targets (make fuzz): a strict
 * reader of RESULT payloads that walks them field by field as the worker
 * does (ngx_sbx_module/ngx_http_sbx_ipc.c, ngx_http_sbx_response.c), and
 * an engine with one script loaded, as a helper has it before its sandbox.
 */

#ifndef FUZZ_COMMON_H
#define FUZZ_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_check.h"
#include "sbx_proto.h"
#include "sbx_engine.h"


typedef struct {
    uint8_t             outcome;
    uint32_t            status;
    uint32_t            nheaders;
    uint32_t            nlogs;
} fuzz_result_t;


static inline int
fuzz_headers(sbx_rd_t *rd, uint32_t *n, int strict)
{
    uint32_t   i;
    sbx_str_t  name, value;

    if (sbx_get_count(rd, n, SBX_MAX_HEADERS, 8) != 0) {
        return -1;
    }

    for (i = 0; i < *n; i++) {
        if (sbx_get_str(rd, &name) != 0 || sbx_get_str(rd, &value) != 0) {
            return -1;
        }

        if (!sbx_header_name_valid(name.data, name.len)
            || !sbx_header_value_valid(value.data, value.len))
        {
            if (strict) {
                return -1;
            }
        }
    }

    return 0;
}


static inline int
fuzz_body(sbx_rd_t *rd)
{
    uint8_t    has;
    sbx_str_t  body;

    if (sbx_get_u8(rd, &has) != 0 || sbx_get_str(rd, &body) != 0) {
        return -1;
    }

    if (has > 1 || (!has && body.len)) {
        return -1;
    }

    return 0;
}


/*
 * A RESULT payload (sbx_proto.h).  Returns 0 when it is well formed: every
 * field present, nothing left over, header names and values valid.
 */

static inline int
fuzz_read_result(const uint8_t *p, size_t len, fuzz_result_t *res)
{
    uint8_t    level;
    uint32_t   i, u32;
    uint64_t   u64;
    sbx_rd_t   rd;
    sbx_str_t  s;

    memset(res, 0, sizeof(*res));
    sbx_rd_init(&rd, p, len);

    if (sbx_get_u8(&rd, &res->outcome) != 0
        || sbx_get_u64(&rd, &u64) != 0
        || sbx_get_u64(&rd, &u64) != 0
        || sbx_get_u32(&rd, &u32) != 0
        || sbx_get_u32(&rd, &u32) != 0
        || sbx_get_count(&rd, &res->nlogs, SBX_MAX_LOG_LINES, 5) != 0)
    {
        return -1;
    }

    for (i = 0; i < res->nlogs; i++) {
        if (sbx_get_u8(&rd, &level) != 0 || sbx_get_str(&rd, &s) != 0) {
            return -1;
        }

        if (level < SBX_LOG_INFO || level > SBX_LOG_ERR) {
            return -1;
        }
    }

    switch (res->outcome) {

    case SBX_OUT_RESPONSE:
        if (sbx_get_u32(&rd, &res->status) != 0
            || res->status < 200 || res->status > 599
            || fuzz_headers(&rd, &res->nheaders, 1) != 0
            || fuzz_body(&rd) != 0)
        {
            return -1;
        }
        break;

    case SBX_OUT_REQUEST:
        if (sbx_get_str(&rd, &s) != 0
            || s.len == 0 || s.data[0] != '/'
            || sbx_get_str(&rd, &s) != 0
            || fuzz_headers(&rd, &res->nheaders, 1) != 0
            || fuzz_body(&rd) != 0)
        {
            return -1;
        }
        break;

    case SBX_OUT_NOHOOK:
        break;

    case SBX_OUT_SCRIPT_ERROR:
    case SBX_OUT_BAD_RETURN:
    case SBX_OUT_INSTRUCTIONS:
    case SBX_OUT_MEMORY:
    case SBX_OUT_TIMEOUT:
        if (sbx_get_str(&rd, &s) != 0) {
            return -1;
        }
        break;

    default:
        return -1;
    }

    return rd.pos == rd.end ? 0 : -1;
}


/* an engine with one script, created and loaded once per process */

static inline sbx_engine_t *
fuzz_engine(const char *source, unsigned *hooks)
{
    char           err[512];
    sbx_script_t   s;
    sbx_engine_t  *e;

    if (sbx_caps_init() != 0) {
        fprintf(stderr, "fuzz: sbx_caps_init() failed\n");
        abort();
    }

    e = sbx_engine_create(err, sizeof(err));
    if (e == NULL) {
        fprintf(stderr, "fuzz: %s\n", err);
        abort();
    }

    memset(&s, 0, sizeof(s));
    s.name.data = (const uint8_t *) "fuzz";
    s.name.len = 4;
    s.chunkname.data = (const uint8_t *) "fuzz.lua";
    s.chunkname.len = 8;
    s.source.data = (const uint8_t *) source;
    s.source.len = strlen(source);
    s.caps = SBX_CAP_JSON | SBX_CAP_BASE64 | SBX_CAP_HEX | SBX_CAP_SHA256
             | SBX_CAP_HMAC | SBX_CAP_LOG;
    s.memory = 8 * 1024 * 1024;
    s.instructions = 1000000;
    s.timeout_ms = 1000;

    if (sbx_engine_load(e, &s, hooks, err, sizeof(err)) < 0) {
        fprintf(stderr, "fuzz: %s\n", err);
        abort();
    }

    sbx_engine_ready(e, 0);

    return e;
}


#endif /* FUZZ_COMMON_H */
