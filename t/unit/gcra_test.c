/*
 * gcra_test.c: unit tests of the GCRA arithmetic (ngx_http_sbx_gcra.c),
 * TAP output.  Built and run by t/32-gcra.t.
 */

#include <stdio.h>
#include <stdint.h>
#include <inttypes.h>

#include "ngx_http_sbx_gcra.h"


static int  test_n;
static int  test_failed;


static void
ok(int cond, const char *name)
{
    test_n++;

    if (!cond) {
        test_failed++;
    }

    printf("%s %d - %s\n", cond ? "ok" : "not ok", test_n, name);
}


static void
is(int64_t got, int64_t want, const char *name)
{
    ok(got == want, name);

    if (got != want) {
        printf("#   got %" PRId64 ", expected %" PRId64 "\n", got, want);
    }
}


int
main(void)
{
    int                         i, passed;
    int64_t                     now, tat, t, dvt;
    ngx_http_sbx_gcra_result_t  r;

    /* 5 per minute, burst 3: T = 12 s */
    t = 12000000;
    dvt = 3 * t;
    now = 1000000000000LL;

    ngx_http_sbx_gcra(now, 0, t, dvt, &r);
    is(r.allowed, 1, "idle key: allowed");
    is(r.remaining, 2, "idle key: 2 remaining");
    is(r.reset, t, "idle key: reset is one interval");
    is(r.retry_after, 0, "allowed: no retry-after");
    is(r.tat, now + t, "TAT advanced by one interval");

    tat = 0;
    passed = 0;

    for (i = 0; i < 10; i++) {
        ngx_http_sbx_gcra(now, tat, t, dvt, &r);
        if (r.allowed) {
            tat = r.tat;
            passed++;
        }
    }

    is(passed, 3, "back to back: exactly burst requests pass");

    ngx_http_sbx_gcra(now, tat, t, dvt, &r);
    is(r.allowed, 0, "fourth denied");
    is(r.remaining, 0, "denied: nothing remaining");
    is(r.retry_after, t, "retry after one interval");
    is(r.reset, 3 * t, "reset: until the key is idle");
    is(r.tat, tat, "denied: TAT unchanged");

    ngx_http_sbx_gcra(now + t - 1, tat, t, dvt, &r);
    is(r.allowed, 0, "one microsecond early: denied");
    is(r.retry_after, 1, "retry after one microsecond");

    ngx_http_sbx_gcra(now + t, tat, t, dvt, &r);
    is(r.allowed, 1, "after one interval: one more passes");
    is(r.remaining, 0, "and the bucket is empty again");

    /* steady rate: one request per interval always passes */
    tat = 0;
    passed = 0;

    for (i = 0; i < 100; i++) {
        ngx_http_sbx_gcra(now + (int64_t) i * t, tat, t, dvt, &r);
        if (r.allowed) {
            tat = r.tat;
            passed++;
        }
    }

    is(passed, 100, "steady rate at the limit: all pass");

    /* twice the rate for 60 s after idle: burst + 60 s / T pass */
    tat = 0;
    passed = 0;

    for (i = 0; i < 10; i++) {
        ngx_http_sbx_gcra(now + (int64_t) i * (t / 2), tat, t, dvt, &r);
        if (r.allowed) {
            tat = r.tat;
            passed++;
        }
    }

    /* over 54 s: 3 (burst) + floor(54 / 12) = 7 */
    is(passed, 7, "twice the rate: burst plus one per interval");

    /* long idle: a stale TAT counts as a new key */
    ngx_http_sbx_gcra(now + 3600 * (int64_t) 1000000, tat, t, dvt, &r);
    is(r.allowed, 1, "after idle: allowed");
    is(r.remaining, 2, "after idle: full burst again");

    /* burst 1: strict spacing */
    ngx_http_sbx_gcra(now, 0, t, t, &r);
    is(r.allowed, 1, "burst 1: first passes");
    is(r.remaining, 0, "burst 1: nothing remaining");
    tat = r.tat;
    ngx_http_sbx_gcra(now + 1, tat, t, t, &r);
    is(r.allowed, 0, "burst 1: second denied");
    is(r.retry_after, t - 1, "burst 1: retry after the rest of T");

    is(ngx_http_sbx_gcra_seconds(0), 0, "seconds(0) = 0");
    is(ngx_http_sbx_gcra_seconds(1), 1, "seconds rounds up");
    is(ngx_http_sbx_gcra_seconds(1000000), 1, "seconds(1 s) = 1");
    is(ngx_http_sbx_gcra_seconds(1000001), 2, "seconds(1 s + 1 us) = 2");
    is(ngx_http_sbx_gcra_seconds(-5), 0, "negative: 0");

    /* the values of rate= and burst= */
#define PARSE(rate, unit, burst)                                              \
    ngx_http_sbx_gcra_parse((const unsigned char *) rate, sizeof(rate) - 1, \
                            (const unsigned char *) unit,                     \
                            unit ? sizeof(unit) - 1 : 0,                      \
                            (const unsigned char *) burst,                    \
                            burst ? sizeof(burst) - 1 : 0, &g)

    {
        ngx_http_sbx_gcra_limit_t  g;

        is(PARSE("10r/m", NULL, NULL), 0, "parse 10r/m");
        is(g.count, 10, "10r/m: N 10");
        is(g.period, 60, "10r/m: a minute");
        is(g.interval, 6000000, "10r/m: T 6 s");
        is(g.burst, 10, "no burst=: B = N");
        is(g.dvt, 60000000, "dvt = B * T");
        is(PARSE("5", "r/h", "2"), 0, "parse rate=5 r/h burst=2");
        is(g.interval, 720000000, "5 r/h: T 720 s");
        is(g.dvt, 1440000000, "burst 2: dvt 1440 s");
        is(PARSE("1000000r/s", NULL, NULL), 0, "1000000r/s is the most");
        is(g.interval, 1, "1000000r/s: T 1 us");
        is(PARSE("1000001r/s", NULL, NULL), -1, "1000001r/s refused");
        is(PARSE("0r/s", NULL, NULL), -1, "0r/s refused");
        is(PARSE("+5r/s", NULL, NULL), -1, "a sign is refused");
        is(PARSE("5r/d", NULL, NULL), -1, "r/d refused");
        is(PARSE("r/s", NULL, NULL), -1, "no number refused");
        is(PARSE("5", "x/s", NULL), -1, "a unit not r/ refused");
        is(PARSE("1r/h", NULL, "9223372036854775807"), -2,
           "a burst that would overflow B * T is refused");
        is(PARSE("1r/h", NULL, "1000000"), 0, "burst 1000000 at 1 r/h");
        is(g.dvt, 3600000000000000LL, "and its dvt fits");
        is(PARSE("1r/s", NULL, "0"), -2, "burst=0 refused");
        is(PARSE("1r/s", NULL, ""), -2, "burst= empty refused");
    }

    printf("1..%d\n", test_n);

    return test_failed ? 1 : 0;
}
