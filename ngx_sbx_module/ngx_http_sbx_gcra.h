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


#include <stdint.h>


typedef struct {
    int       allowed;
    int64_t   tat;           /* TAT to store when allowed */
    int64_t   remaining;     /* requests that would pass now */
    int64_t   reset;         /* until the key is idle again */
    int64_t   retry_after;   /* until this request would pass; 0 if it did */
} ngx_http_sbx_gcra_result_t;


/* tat: stored TAT or 0 for a new key; interval: T; dvt: B * T */
void ngx_http_sbx_gcra(int64_t now, int64_t tat, int64_t interval,
    int64_t dvt, ngx_http_sbx_gcra_result_t *res);

/* microseconds to whole seconds, rounded up */
int64_t ngx_http_sbx_gcra_seconds(int64_t us);


#endif /* _NGX_HTTP_SBX_GCRA_H_INCLUDED_ */
