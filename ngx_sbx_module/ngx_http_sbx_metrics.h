/*
 * ngx_http_sbx_metrics.h: helpers shared by the audit and the metrics
 * modules (ngx_http_sbx_audit.c, ngx_http_sbx_metrics.c).
 */

#ifndef _NGX_HTTP_SBX_METRICS_H_INCLUDED_
#define _NGX_HTTP_SBX_METRICS_H_INCLUDED_


#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include "ngx_http_sbx_module.h"


/* room ngx_http_sbx_json_str() needs for a string of len bytes */
#define ngx_http_sbx_json_str_len(len)  (6 * (len) + 2)

/*
 * Writes src as a quoted JSON string: '"' and '\' and control characters
 * are escaped, valid UTF-8 is kept, invalid bytes become U+FFFD.
 */
u_char *ngx_http_sbx_json_str(u_char *dst, u_char *src, size_t len);

/* connector route request: the context, else NULL */
ngx_http_sbx_ctx_t *ngx_http_sbx_log_ctx(ngx_http_request_t *r);

/* the decision to report: an undecided request was allowed */
ngx_uint_t ngx_http_sbx_log_decision(ngx_http_sbx_ctx_t *ctx);

/* as $request_time, in milliseconds */
ngx_msec_t ngx_http_sbx_request_ms(ngx_http_request_t *r);


#endif /* _NGX_HTTP_SBX_METRICS_H_INCLUDED_ */
