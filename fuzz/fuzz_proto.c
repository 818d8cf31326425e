/*
 * fuzz_proto.c: the frame and payload codec of lua-runtime/sbx_proto.c,
 * as both ends use it.
 *
 *   - the frame header: read and checked as the helper and the worker do;
 *   - a RESULT payload walked as the worker reads it (fuzz_common.h);
 *   - the readers against the writers: the first byte gives a number of
 *     fields, the next bytes their types; what the readers accept from the
 *     rest, the writers must write back byte for byte, and measure alike.
 */

#include "fuzz_common.h"


#define FUZZ_MAX_FIELDS  32


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fuzz_roundtrip(const uint8_t *data, size_t size)
{
    size_t          i, n, used;
    uint8_t         u8, *buf;
    uint32_t        u32;
    uint64_t        u64;
    sbx_rd_t        rd;
    sbx_wr_t        w, m;
    sbx_str_t       s;
    const uint8_t  *ops;

    if (size < 1) {
        return;
    }

    n = data[0] % FUZZ_MAX_FIELDS;

    if (size < 1 + n) {
        return;
    }

    ops = data + 1;
    data += 1 + n;
    size -= 1 + n;

    buf = malloc(size ? size : 1);
    FUZZ_CHECK(buf != NULL);

    used = 0;
    sbx_rd_init(&rd, data, size);
    sbx_wr_init(&w, buf, size);
    sbx_wr_init(&m, NULL, 0);

    for (i = 0; i < n; i++) {
        switch (ops[i] % 5) {

        case 0:
            if (sbx_get_u8(&rd, &u8) == 0) {
                sbx_put_u8(&w, u8);
                sbx_put_u8(&m, u8);
            }
            break;

        case 1:
            if (sbx_get_u32(&rd, &u32) == 0) {
                sbx_put_u32(&w, u32);
                sbx_put_u32(&m, u32);
            }
            break;

        case 2:
            if (sbx_get_u64(&rd, &u64) == 0) {
                sbx_put_u64(&w, u64);
                sbx_put_u64(&m, u64);
            }
            break;

        case 3:
            if (sbx_get_str(&rd, &s) == 0) {
                FUZZ_CHECK(s.data >= data && s.data + s.len <= data + size);
                sbx_put_str(&w, s.data, s.len);
                sbx_put_str(&m, s.data, s.len);
            }
            break;

        default:
            if (sbx_get_count(&rd, &u32, SBX_MAX_HEADERS, ops[i] % 17) == 0)
            {
                FUZZ_CHECK(u32 <= SBX_MAX_HEADERS);
                FUZZ_CHECK(ops[i] % 17 == 0
                           || (size_t) (rd.end - rd.pos) / (ops[i] % 17)
                              >= u32);
                sbx_put_u32(&w, u32);
                sbx_put_u32(&m, u32);
            }
            break;
        }

        FUZZ_CHECK(rd.pos >= data && rd.pos <= rd.end);

        if (rd.err) {
            /* an error sticks: nothing after it is read */
            FUZZ_CHECK(sbx_get_u8(&rd, &u8) == -1);
            break;
        }

        used = (size_t) (rd.pos - data);
    }

    FUZZ_CHECK(!w.overflow);
    FUZZ_CHECK((size_t) (w.pos - w.start) == used);
    FUZZ_CHECK(m.need == used && w.need == used);
    FUZZ_CHECK(memcmp(buf, data, used) == 0);

    free(buf);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_result_t    res;
    sbx_frame_hdr_t  h;

    if (size >= SBX_FRAME_HDR_SIZE) {
        sbx_frame_hdr_read(data, &h);

        if (sbx_frame_hdr_check(&h, 1024 * 1024) == 0) {
            FUZZ_CHECK(h.type >= SBX_MSG_INIT && h.type <= SBX_MSG_RESULT);
            FUZZ_CHECK(h.len <= 1024 * 1024);
        }

        if (fuzz_read_result(data + SBX_FRAME_HDR_SIZE,
                             size - SBX_FRAME_HDR_SIZE, &res) == 0)
        {
            FUZZ_CHECK(res.nlogs <= SBX_MAX_LOG_LINES);
            FUZZ_CHECK(res.nheaders <= SBX_MAX_HEADERS);
        }
    }

    (void) fuzz_read_result(data, size, &res);

    (void) sbx_header_name_valid(data, size);
    (void) sbx_header_value_valid(data, size);

    fuzz_roundtrip(data, size);

    return 0;
}
