/*
 * fuzz_params.c: parameter parsers and arithmetic that are pure functions.
 *
 *   - sbx_caps_parse(): the capability list of the helper's check and run
 *     commands ("json,base64 log");
 *   - ngx_http_sbx_gcra(): the rate limiter's arithmetic, over the values
 *     its directive accepts (rate N r/s|m|h, burst B) and any stored TAT
 *     a shared-memory zone or Redis may hand back within a day of now;
 *   - ngx_http_sbx_gcra_parse(): the rate= and burst= values of
 *     sbx_rate_limit, as its directive handler hands them over.
 *
 * The other directive handlers (sbx_pool, limits, ...) parse ngx_conf_t
 * arguments with nginx's own ngx_atoi() and ngx_parse_size(): not
 * separable, they are tested through nginx -t.
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


/*
 * ngx_http_sbx_gcra_parse(): the input is "RATE|UNIT|BURST" (UNIT empty:
 * the "Nr/u" form; no second '|': no burst).  What it accepts must be in
 * range, free of overflow, and parse again to the same limit when written
 * back in the canonical form.
 */

static void
fuzz_rate(const uint8_t *data, size_t size)
{
    int                         rc;
    char                        buf[64];
    size_t                      rate_len, unit_len = 0, burst_len = 0;
    const uint8_t              *unit = NULL, *burst = NULL, *bar, *end;
    ngx_http_sbx_gcra_limit_t   g, again;

    end = data + size;
    bar = memchr(data, '|', size);
    rate_len = bar ? (size_t) (bar - data) : size;

    if (bar) {
        unit = bar + 1;
        bar = memchr(unit, '|', (size_t) (end - unit));
        unit_len = bar ? (size_t) (bar - unit) : (size_t) (end - unit);

        if (bar) {
            burst = bar + 1;
            burst_len = (size_t) (end - burst);
        }

        if (unit_len == 0) {
            unit = NULL;
        }
    }

    rc = ngx_http_sbx_gcra_parse(data, rate_len, unit, unit_len, burst,
                                 burst_len, &g);

    FUZZ_CHECK(rc == 0 || rc == -1 || rc == -2);

    if (rc != 0) {
        return;
    }

    FUZZ_CHECK(g.count >= 1 && g.count <= NGX_HTTP_SBX_GCRA_MAX);
    FUZZ_CHECK(g.burst >= 1 && g.burst <= NGX_HTTP_SBX_GCRA_MAX);
    FUZZ_CHECK(burst != NULL || g.burst == g.count);
    FUZZ_CHECK((g.unit == 's' && g.period == 1)
               || (g.unit == 'm' && g.period == 60)
               || (g.unit == 'h' && g.period == 3600));
    FUZZ_CHECK(g.interval >= 1);
    FUZZ_CHECK(g.interval * g.count <= g.period * 1000000);
    FUZZ_CHECK((g.interval + 1) * g.count > g.period * 1000000);
    FUZZ_CHECK(g.dvt / g.interval == g.burst && g.dvt % g.interval == 0);

    /* the canonical form parses to the same limit */
    rc = snprintf(buf, sizeof(buf), "%lldr/%c", (long long) g.count, g.unit);
    FUZZ_CHECK(rc > 0 && (size_t) rc < sizeof(buf));
    FUZZ_CHECK(ngx_http_sbx_gcra_parse((const uint8_t *) buf, (size_t) rc,
                                       NULL, 0, burst, burst_len, &again)
               == 0);
    FUZZ_CHECK(again.count == g.count && again.period == g.period
               && again.burst == g.burst && again.dvt == g.dvt);
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
    fuzz_rate(data, size);

    return 0;
}
