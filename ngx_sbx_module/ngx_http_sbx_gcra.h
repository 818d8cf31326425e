/*
 * ngx_http_sbx_gcra.h: the generic cell rate algorithm (GCRA) of the rate
 * limiter, as pure arithmetic.  It includes no nginx header so that
 * t/unit/gcra_test.c can test it alone.
 *
 * A limit of N requests per period P with capacity B ("burst") has the
 * emission interval T = P / N and the delay variation tolerance
 * dvt = B * T.  The only state per key is the theoretical arrival time
 * (TAT).  A request at `now' is allowed when now >= TAT' - dvt, where
 * TAT' = max(TAT, now) + T; an allowed request stores TAT'.  B requests
 * pass back to back from an idle key, then one every T.
 *
 * The Redis script in ngx_http_sbx_ratelimit.c is the same arithmetic;
 * keep them in step.  All times are microseconds.
 */

#ifndef _NGX_HTTP_SBX_GCRA_H_INCLUDED_
#define _NGX_HTTP_SBX_GCRA_H_INCLUDED_


#include <stddef.h>
#include <stdint.h>


typedef struct {
    int       allowed;
    int64_t   tat;           /* TAT to store when allowed */
    int64_t   remaining;     /* requests that would pass now */
    int64_t   reset;         /* until the key is idle again */
    int64_t   retry_after;   /* until this request would pass; 0 if it did */
} ngx_http_sbx_gcra_result_t;


/* a limit as sbx_rate_limit gives it */
typedef struct {
    int64_t   count;         /* N of "rate=N r/u", 1 to 1000000 */
    int64_t   period;        /* seconds: 1, 60 or 3600 */
    int64_t   burst;         /* B, 1 to 1000000; N when not given */
    int64_t   interval;      /* T = period / N, microseconds, at least 1 */
    int64_t   dvt;           /* B * T */
    char      unit;          /* 's', 'm' or 'h' */
} ngx_http_sbx_gcra_limit_t;

#define NGX_HTTP_SBX_GCRA_MAX  1000000

/*
 * Parses the values of "rate=N r/u" or "rate=Nr/u" (rate: "N" with unit
 * "r/u", or "Nr/u" with unit NULL) and of "burst=B" (burst NULL: B = N).
 * Returns 0, -1 for a bad rate or -2 for a bad burst.  Plain decimal
 * digits only, no sign, no overflow; the directive's handler and
 * fuzz/fuzz_params.c call it.
 */
int ngx_http_sbx_gcra_parse(const unsigned char *rate, size_t rate_len,
    const unsigned char *unit, size_t unit_len, const unsigned char *burst,
    size_t burst_len, ngx_http_sbx_gcra_limit_t *limit);

/* tat: stored TAT or 0 for a new key; interval: T; dvt: B * T */
void ngx_http_sbx_gcra(int64_t now, int64_t tat, int64_t interval,
    int64_t dvt, ngx_http_sbx_gcra_result_t *res);

/* microseconds to whole seconds, rounded up */
int64_t ngx_http_sbx_gcra_seconds(int64_t us);


#endif /* _NGX_HTTP_SBX_GCRA_H_INCLUDED_ */
