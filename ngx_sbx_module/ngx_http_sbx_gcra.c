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
