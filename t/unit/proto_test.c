/*
 * proto_test.c: unit tests of the frame codec shared by the worker and the
 * helper (lua-runtime/sbx_proto.c).  Prints TAP; t/07-proto.t builds and
 * runs it.  Every reader call is fed malformed, truncated and oversized
 * input and must fail cleanly, never read past the buffer (run it under
 * ASan to prove that part).
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sbx_proto.h"


static int  sbx_test_n;
static int  sbx_test_failed;


static void
ok(int cond, const char *name)
{
    sbx_test_n++;

    if (!cond) {
        sbx_test_failed++;
    }

    printf("%sok %d - %s\n", cond ? "" : "not ", sbx_test_n, name);
}


/* a copy in its own heap block, so ASan sees any read past its end */

static uint8_t *
dup_exact(const uint8_t *p, size_t len)
{
    uint8_t  *d = malloc(len ? len : 1);

    if (d == NULL) {
        exit(2);
    }

    memcpy(d, p, len);

    return d;
}


static void
test_header(void)
{
    uint8_t          buf[SBX_FRAME_HDR_SIZE];
    sbx_frame_hdr_t  h;

    sbx_frame_hdr_write(buf, 1234, SBX_MSG_CALL, SBX_HOOK_RESPONSE, 77, 5);
    sbx_frame_hdr_read(buf, &h);

    ok(h.len == 1234 && h.type == SBX_MSG_CALL
       && h.flags == SBX_HOOK_RESPONSE && h.id == 77 && h.aux == 5,
       "header round trip");
    ok(sbx_frame_hdr_check(&h, 4096) == 0, "header within the cap accepted");
    ok(sbx_frame_hdr_check(&h, 1000) != 0, "header over the cap refused");

    h.type = 0;
    ok(sbx_frame_hdr_check(&h, 4096) != 0, "message type 0 refused");
    h.type = SBX_MSG_RESULT + 1;
    ok(sbx_frame_hdr_check(&h, 4096) != 0, "unknown message type refused");

    h.type = SBX_MSG_RESULT;
    h.len = 0xffffffff;
    ok(sbx_frame_hdr_check(&h, 0xffffffff) != 0,
       "length over SBX_FRAME_MAX refused whatever the cap");
}


static void
test_round_trip(void)
{
    uint8_t    buf[256], u8;
    uint32_t   u32;
    uint64_t   u64;
    sbx_wr_t   w;
    sbx_rd_t   r;
    sbx_str_t  s, e;

    sbx_wr_init(&w, NULL, 0);
    sbx_put_u8(&w, 7);
    sbx_put_u32(&w, 0xdeadbeef);
    sbx_put_u64(&w, 0x0102030405060708ULL);
    sbx_put_str(&w, "hello", 5);
    sbx_put_str(&w, NULL, 0);
    ok(w.need == 1 + 4 + 8 + 4 + 5 + 4 && !w.overflow,
       "measuring pass counts every byte");

    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u8(&w, 7);
    sbx_put_u32(&w, 0xdeadbeef);
    sbx_put_u64(&w, 0x0102030405060708ULL);
    sbx_put_str(&w, "hello", 5);
    sbx_put_str(&w, NULL, 0);
    ok(!w.overflow && (size_t) (w.pos - buf) == w.need,
       "writing pass writes what it measured");

    sbx_rd_init(&r, buf, w.need);
    ok(sbx_get_u8(&r, &u8) == 0 && u8 == 7, "u8 read back");
    ok(sbx_get_u32(&r, &u32) == 0 && u32 == 0xdeadbeef, "u32 read back");
    ok(sbx_get_u64(&r, &u64) == 0 && u64 == 0x0102030405060708ULL,
       "u64 read back");
    ok(sbx_get_str(&r, &s) == 0 && s.len == 5
       && memcmp(s.data, "hello", 5) == 0, "string read back");
    ok(sbx_get_str(&r, &e) == 0 && e.len == 0, "empty string read back");
    ok(r.pos == r.end && !r.err, "reader consumed exactly the payload");
    ok(sbx_get_u8(&r, &u8) != 0 && r.err, "read past the end fails");
    ok(sbx_get_u32(&r, &u32) != 0, "and the error is sticky");
}


static void
test_overflow(void)
{
    uint8_t   buf[8];
    sbx_wr_t  w;

    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u64(&w, 1);
    ok(!w.overflow, "exact fit does not overflow");
    sbx_put_u8(&w, 1);
    ok(w.overflow, "one byte more overflows");

    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_str(&w, "abcdefgh", 8);
    ok(w.overflow, "string larger than the room overflows");
    ok(w.pos <= buf + sizeof(buf), "writer never passes its end");
}


static void
test_truncated(void)
{
    uint8_t    full[64], *p;
    size_t     len, cut;
    sbx_wr_t   w;
    sbx_rd_t   r;
    sbx_str_t  s;
    uint32_t   u32;
    uint64_t   u64;
    int        all_failed = 1;

    sbx_wr_init(&w, full, sizeof(full));
    sbx_put_u32(&w, 42);
    sbx_put_u64(&w, 43);
    sbx_put_str(&w, "payload-bytes", 13);
    len = w.need;

    for (cut = 0; cut < len; cut++) {
        p = dup_exact(full, cut);
        sbx_rd_init(&r, p, cut);

        if (sbx_get_u32(&r, &u32) == 0 && sbx_get_u64(&r, &u64) == 0
            && sbx_get_str(&r, &s) == 0)
        {
            all_failed = 0;
        }

        free(p);
    }

    ok(all_failed, "every truncation of a payload is refused");

    p = dup_exact(full, len);
    sbx_rd_init(&r, p, len);
    ok(sbx_get_u32(&r, &u32) == 0 && sbx_get_u64(&r, &u64) == 0
       && sbx_get_str(&r, &s) == 0, "the whole payload is accepted");
    free(p);
}


static void
test_hostile_lengths(void)
{
    uint8_t    buf[16], *p;
    uint32_t   n;
    sbx_wr_t   w;
    sbx_rd_t   r;
    sbx_str_t  s;

    /* a string that claims 4 GiB with 4 bytes behind it */
    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u32(&w, 0xffffffff);
    sbx_put_u32(&w, 0x41414141);
    p = dup_exact(buf, w.need);
    sbx_rd_init(&r, p, w.need);
    ok(sbx_get_str(&r, &s) != 0, "string length past the payload refused");
    free(p);

    /* a count over the hard maximum */
    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u32(&w, SBX_MAX_HEADERS + 1);
    p = dup_exact(buf, w.need);
    sbx_rd_init(&r, p, w.need);
    ok(sbx_get_count(&r, &n, SBX_MAX_HEADERS, 8) != 0,
       "count over its maximum refused");
    free(p);

    /* a count the remaining bytes cannot hold */
    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u32(&w, 3);
    sbx_put_u64(&w, 0);
    p = dup_exact(buf, w.need);
    sbx_rd_init(&r, p, w.need);
    ok(sbx_get_count(&r, &n, SBX_MAX_HEADERS, 8) != 0,
       "count larger than the bytes left refused");
    free(p);

    sbx_wr_init(&w, buf, sizeof(buf));
    sbx_put_u32(&w, 1);
    sbx_put_u64(&w, 0);
    p = dup_exact(buf, w.need);
    sbx_rd_init(&r, p, w.need);
    ok(sbx_get_count(&r, &n, SBX_MAX_HEADERS, 8) == 0 && n == 1,
       "count that fits accepted");
    free(p);

    sbx_rd_init(&r, buf, 0);
    ok(sbx_get_count(&r, &n, 10, 1) != 0, "count from an empty payload");
}


static void
test_headers(void)
{
    char  big[SBX_MAX_HEADER_VALUE + 2];

    ok(sbx_header_name_valid((const uint8_t *) "X-Request-Id", 12),
       "token name accepted");
    ok(!sbx_header_name_valid((const uint8_t *) "", 0), "empty name refused");
    ok(!sbx_header_name_valid((const uint8_t *) "bad name", 8),
       "name with a space refused");
    ok(!sbx_header_name_valid((const uint8_t *) "x-a:b", 5),
       "name with a colon refused");
    ok(!sbx_header_name_valid((const uint8_t *) "x\0y", 3),
       "name with NUL refused");
    ok(!sbx_header_name_valid((const uint8_t *) "x\r\ny", 4),
       "name with CRLF refused");

    ok(sbx_header_value_valid((const uint8_t *) "a b\tc", 5),
       "value with space and tab accepted");
    ok(!sbx_header_value_valid((const uint8_t *) "a\r\nSet-Cookie: x", 16),
       "value with CRLF refused");
    ok(!sbx_header_value_valid((const uint8_t *) "a\nb", 3),
       "value with LF refused");
    ok(!sbx_header_value_valid((const uint8_t *) "a\0b", 3),
       "value with NUL refused");
    ok(!sbx_header_value_valid((const uint8_t *) "a\x7f", 2),
       "value with DEL refused");

    memset(big, 'a', sizeof(big));
    ok(sbx_header_value_valid((const uint8_t *) big, SBX_MAX_HEADER_VALUE),
       "value at the size cap accepted");
    ok(!sbx_header_value_valid((const uint8_t *) big,
                               SBX_MAX_HEADER_VALUE + 1),
       "value over the size cap refused");
}


static void
test_random(void)
{
    int         i, j, reads;
    size_t      len;
    uint8_t    *p;
    uint32_t    n;
    sbx_rd_t    r;
    sbx_str_t   s;
    unsigned    seed = 12345;

    reads = 0;

    for (i = 0; i < 20000; i++) {
        len = (size_t) (rand_r(&seed) % 64);
        p = malloc(len ? len : 1);

        if (p == NULL) {
            exit(2);
        }

        for (j = 0; j < (int) len; j++) {
            p[j] = (uint8_t) rand_r(&seed);
        }

        sbx_rd_init(&r, p, len);

        while (sbx_get_count(&r, &n, 8, 4) == 0) {
            for (j = 0; j < (int) n; j++) {
                if (sbx_get_str(&r, &s) != 0) {
                    break;
                }

                if (s.data < p || s.data + s.len > p + len) {
                    reads = -1000000;
                }

                reads++;
            }
        }

        free(p);
    }

    ok(reads >= 0, "20000 random payloads: every string inside its buffer");
}


int
main(void)
{
    test_header();
    test_round_trip();
    test_overflow();
    test_truncated();
    test_hostile_lengths();
    test_headers();
    test_random();

    printf("1..%d\n", sbx_test_n);

    return sbx_test_failed ? 1 : 0;
}
