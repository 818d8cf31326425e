/*
 * fuzz_audit.c: the audit verifier's line parser (tools/sbx_audit_verify.c,
 * sbx_av_line()), fed the fuzz input as the lines of an audit file.
 *
 * Checks: no crash, leak or undefined behaviour on any line; a refusal
 * always says why; and whatever prefix of the input verified, a line the
 * module could write next (its "seq" one more, its "prev" the SHA-256 of
 * the last line that verified) verifies too, while the same line with
 * "prev" off by one digit does not.
 */

#define SBX_AV_NO_MAIN
#include "../tools/sbx_audit_verify.c"
#include "fuzz_check.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static void
fuzz_next(sbx_av_t *av, const unsigned char *last, size_t lastlen)
{
    int            n;
    char           line[256], hex[2 * SBX_AV_HASH_LEN + 1];
    unsigned char  md[SBX_AV_HASH_LEN];

    if (av->lines == 0) {
        n = snprintf(line, sizeof(line),
                     "{\"decision\":\"allowed\",\"seq\":1,\"prev\":null}");

    } else {
        FUZZ_CHECK(sbx_av_sha256(last, lastlen, md) == 0);
        sbx_av_hex(md, SBX_AV_HASH_LEN, hex);

        /* first the same line with a wrong "prev": refused */
        hex[0] = hex[0] == '0' ? '1' : '0';
        n = snprintf(line, sizeof(line),
                     "{\"decision\":\"allowed\",\"seq\":%lld,\"prev\":\"%s\"}",
                     av->prev_seq + 1, hex);
        FUZZ_CHECK(sbx_av_line(av, (unsigned char *) line, (size_t) n) != 0);
        FUZZ_CHECK(av->why[0] != '\0');

        hex[0] = hex[0] == '0' ? '1' : '0';
        sbx_av_hex(md, SBX_AV_HASH_LEN, hex);
        n = snprintf(line, sizeof(line),
                     "{\"decision\":\"allowed\",\"seq\":%lld,\"prev\":\"%s\"}",
                     av->prev_seq + 1, hex);
    }

    FUZZ_CHECK(n > 0 && (size_t) n < sizeof(line));
    FUZZ_CHECK(sbx_av_line(av, (unsigned char *) line, (size_t) n) == 0);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t                     len, lastlen = 0;
    unsigned long long         lines;
    const uint8_t             *p, *nl, *end, *last = NULL;
    static sbx_av_t            av;
    static int                 init;

    if (!init) {
        FUZZ_CHECK(sbx_av_init(&av) == 0);
        init = 1;
    }

    sbx_av_reset(&av);

    p = data;
    end = data + size;

    while (p < end) {
        nl = memchr(p, '\n', (size_t) (end - p));
        len = (nl ? nl : end) - p;
        lines = av.lines;

        if (sbx_av_line(&av, p, len) != 0) {
            FUZZ_CHECK(av.why[0] != '\0');
            FUZZ_CHECK(av.lines == lines);
            break;
        }

        FUZZ_CHECK(av.lines == lines + 1);
        last = p;
        lastlen = len;
        p += len + 1;
    }

    fuzz_next(&av, last, lastlen);

    return 0;
}
