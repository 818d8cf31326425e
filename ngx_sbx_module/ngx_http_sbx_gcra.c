/*
 * ngx_http_sbx_gcra.c: GCRA arithmetic (see ngx_http_sbx_gcra.h).
 */

#include "ngx_http_sbx_gcra.h"


void
ngx_http_sbx_gcra(int64_t now, int64_t tat, int64_t interval, int64_t dvt,
    ngx_http_sbx_gcra_result_t *res)
{
    int64_t  new_tat, allow_at;

    if (tat < now) {
        tat = now;
    }

    new_tat = tat + interval;
    allow_at = new_tat - dvt;

    if (now < allow_at) {
        res->allowed = 0;
        res->tat = tat;
        res->remaining = 0;
        res->reset = tat - now;
        res->retry_after = allow_at - now;
        return;
    }

    res->allowed = 1;
    res->tat = new_tat;
    res->remaining = (now + dvt - new_tat) / interval;
    res->reset = new_tat - now;
    res->retry_after = 0;
}


int64_t
ngx_http_sbx_gcra_seconds(int64_t us)
{
    if (us <= 0) {
        return 0;
    }

    return (us + 999999) / 1000000;
}


/* 1 to NGX_HTTP_SBX_GCRA_MAX in decimal digits, else -1 */

static int64_t
ngx_http_sbx_gcra_number(const unsigned char *p, size_t len)
{
    int64_t  n = 0;

    if (len == 0 || len > 7) {
        return -1;
    }

    while (len--) {
        if (*p < '0' || *p > '9') {
            return -1;
        }

        n = n * 10 + (*p++ - '0');
    }

    return n >= 1 && n <= NGX_HTTP_SBX_GCRA_MAX ? n : -1;
}


int
ngx_http_sbx_gcra_parse(const unsigned char *rate, size_t rate_len,
    const unsigned char *unit, size_t unit_len, const unsigned char *burst,
    size_t burst_len, ngx_http_sbx_gcra_limit_t *limit)
{
    if (unit == NULL) {
        /* "Nr/u" */
        if (rate_len < 4) {
            return -1;
        }

        unit = rate + rate_len - 3;
        unit_len = 3;
        rate_len -= 3;
    }

    if (unit_len != 3 || unit[0] != 'r' || unit[1] != '/') {
        return -1;
    }

    switch (unit[2]) {
    case 's':
        limit->period = 1;
        break;
    case 'm':
        limit->period = 60;
        break;
    case 'h':
        limit->period = 3600;
        break;
    default:
        return -1;
    }

    limit->unit = (char) unit[2];
    limit->count = ngx_http_sbx_gcra_number(rate, rate_len);

    if (limit->count < 0) {
        return -1;
    }

    if (burst) {
        limit->burst = ngx_http_sbx_gcra_number(burst, burst_len);

        if (limit->burst < 0) {
            return -2;
        }

    } else {
        limit->burst = limit->count;
    }

    /* at most 3600 s / 1 = 3.6e9 us, times 1e6: below 2^63 */
    limit->interval = limit->period * 1000000 / limit->count;
    limit->dvt = limit->burst * limit->interval;

    return 0;
}
