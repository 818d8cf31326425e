/*
 * fuzz_params.c: parameter parsers and arithmetic that are pure functions.
 *
 *   - sbx_caps_parse(): the capability list of the helper's check and run
 *     commands ("json,base64 log");
 *   - ngx_http_sbx_gcra(): the rate limiter's arithmetic, over the values
 *     its directive accepts (rate N r/s|m|h, burst B) and any stored TAT
 *     a shared-memory zone or Redis may hand back within a day of now.
 *
 * The nginx directive handlers themselves (sbx_rate_limit, sbx_pool, ...)
 * parse ngx_conf_t arguments with nginx's own ngx_atoi() and
 * ngx_parse_size(): not separable, they are tested through nginx -t.
 */

#include "fuzz_common.h"
#include "ngx_http_sbx_gcra.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static uint64_t
fuzz_u64(const uint8_t **p, size_t *size)
{
    uint64_t  v = 0;

    if (*size >= 8) {
        memcpy(&v, *p, 8);
        *p += 8;
        *size -= 8;
    }

    return v;
}


static void
fuzz_gcra(const uint8_t *data, size_t size)
{
    int64_t                     now, tat, interval, dvt, n, burst;
    uint64_t                    a, b, c, d;
    ngx_http_sbx_gcra_result_t  r;

    static const int64_t  periods[] = { 1000000, 60000000, 3600000000LL };

    a = fuzz_u64(&data, &size);
    b = fuzz_u64(&data, &size);
    c = fuzz_u64(&data, &size);
    d = fuzz_u64(&data, &size);

    /* microseconds since the epoch, up to the year 2255 */
    now = (int64_t) (a % (1ULL << 58));
    n = (int64_t) (b % 1000000000) + 1;
    burst = (int64_t) (c % 1000000);
    interval = periods[b % 3] / n;

    if (interval < 1) {
        interval = 1;
    }

    dvt = burst * interval;

    /* 0 (a new key) or a stored TAT within a day either side of now */
    tat = (d & 1) ? 0 : now - 86400000000LL
                        + (int64_t) (d % (2 * 86400000000ULL));

    ngx_http_sbx_gcra(now, tat, interval, dvt, &r);

    FUZZ_CHECK(r.remaining >= 0);
    FUZZ_CHECK(r.reset >= 0);
    FUZZ_CHECK(r.retry_after >= 0);

    if (r.allowed) {
        FUZZ_CHECK(r.retry_after == 0);
        FUZZ_CHECK(r.tat > now && r.tat >= tat);
        FUZZ_CHECK(r.remaining <= burst);

    } else {
        FUZZ_CHECK(r.tat == (tat < now ? now : tat));
        FUZZ_CHECK(r.retry_after > 0
                   && r.retry_after <= r.tat - now + interval);
    }

    FUZZ_CHECK(ngx_http_sbx_gcra_seconds(r.retry_after) * 1000000
               >= r.retry_after);
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char      *s, err[256];
    uint32_t   caps;

    s = malloc(size + 1);
    FUZZ_CHECK(s != NULL);
    memcpy(s, data, size);
    s[size] = '\0';

    err[0] = '\0';

    if (sbx_caps_parse(s, &caps, err, sizeof(err)) == 0) {
        FUZZ_CHECK((caps & ~(uint32_t) 0x3f) == 0);

    } else {
        FUZZ_CHECK(strncmp(err, "unknown capability", 18) == 0);
    }

    free(s);

    fuzz_gcra(data, size);

    return 0;
}
