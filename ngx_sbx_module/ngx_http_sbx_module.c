/*
 * ngx_http_sbx_module.c: connectors, helper pools, lifecycle; the module's
 * directives, contexts and configuration.  The helper pool runtime is in
 * ngx_http_sbx_pool.c, the frames in ngx_http_sbx_ipc.c, content mode in
 * ngx_http_sbx_content.c, script loading in ngx_http_sbx_script.c.
 */

#define _GNU_SOURCE

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <dlfcn.h>

#include "ngx_http_sbx_module.h"


#define NGX_HTTP_SBX_DEFAULT_POOL_SIZE     2
#define NGX_HTTP_SBX_DEFAULT_QUEUE         64
#define NGX_HTTP_SBX_DEFAULT_PIPELINE      4
#define NGX_HTTP_SBX_DEFAULT_MAX_REQUESTS  100000
#define NGX_HTTP_SBX_DEFAULT_POOL_MEMORY   (1024 * 1024 * 1024)
#define NGX_HTTP_SBX_MAX_POOL_SIZE         64


static ngx_int_t ngx_http_sbx_preaccess_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_header_filter(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_add_variables(ngx_conf_t *cf);
static ngx_int_t ngx_http_sbx_connector_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_sbx_decision_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static void *ngx_http_sbx_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_init_main_conf(ngx_conf_t *cf, void *conf);
static void *ngx_http_sbx_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child);
static ngx_int_t ngx_http_sbx_postconfiguration(ngx_conf_t *cf);
static ngx_int_t ngx_http_sbx_init_process(ngx_cycle_t *cycle);
static void ngx_http_sbx_exit_process(ngx_cycle_t *cycle);

static char *ngx_http_sbx_pool_directive(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_sbx_connector_block(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_sbx_connector_body(ngx_conf_t *cf, ngx_command_t *dummy,
    void *conf);
static char *ngx_http_sbx_connector_location(ngx_conf_t *cf,
    ngx_command_t *cmd, void *conf);

static ngx_http_sbx_pool_t *ngx_http_sbx_find_pool(
    ngx_http_sbx_main_conf_t *smcf, ngx_str_t *name);




static ngx_command_t  ngx_http_sbx_commands[] = {

    { ngx_string("sbx_helper_path"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_conf_set_str_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_sbx_main_conf_t, helper_path),
      NULL },

    { ngx_string("sbx_require_pinned"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_MAIN_CONF_OFFSET,
      offsetof(ngx_http_sbx_main_conf_t, require_pinned),
      NULL },

    { ngx_string("sbx_pool"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_1MORE,
      ngx_http_sbx_pool_directive,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_connector"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_BLOCK|NGX_CONF_TAKE1,
      ngx_http_sbx_connector_block,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_connector"),
      NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sbx_connector_location,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_module_ctx = {
    ngx_http_sbx_add_variables,            /* preconfiguration */
    ngx_http_sbx_postconfiguration,        /* postconfiguration */

    ngx_http_sbx_create_main_conf,         /* create main configuration */
    ngx_http_sbx_init_main_conf,           /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sbx_create_loc_conf,          /* create location configuration */
    ngx_http_sbx_merge_loc_conf            /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_module_ctx,              /* module context */
    ngx_http_sbx_commands,                 /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    ngx_http_sbx_init_process,             /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    ngx_http_sbx_exit_process,             /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_sbx_vars[] = {

    { ngx_string("sbx_connector"), NULL, ngx_http_sbx_connector_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("sbx_decision"), NULL, ngx_http_sbx_decision_variable,
      0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

      ngx_http_null_variable
};


static ngx_str_t  ngx_http_sbx_state_names[] = {
    ngx_string("beta"),
    ngx_string("ga"),
    ngx_string("deprecated"),
    ngx_string("retired"),
    ngx_null_string
};


static ngx_http_output_header_filter_pt  ngx_http_next_header_filter;


/* ---- lifecycle: retired answers 410, deprecated announces it ---- */

static ngx_int_t
ngx_http_sbx_preaccess_handler(ngx_http_request_t *r)
{
    ngx_http_sbx_ctx_t        *ctx;
    ngx_http_sbx_loc_conf_t   *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);

    if (slcf->connector == NULL || r != r->main) {
        return NGX_DECLINED;
    }

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    ctx->connector = slcf->connector;

    if (slcf->connector->state == NGX_HTTP_SBX_STATE_RETIRED) {
        ngx_http_finalize_request(r,
            ngx_http_sbx_send_error(r, 410, NGX_HTTP_SBX_RETIRED,
                                    0));
        return NGX_DONE;
    }

    return NGX_DECLINED;
}


static ngx_int_t
ngx_http_sbx_header_filter(ngx_http_request_t *r)
{
    ngx_table_elt_t           *h;
    ngx_http_sbx_loc_conf_t   *slcf;
    ngx_http_sbx_connector_t  *c;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);

    if (slcf == NULL || slcf->connector == NULL || r != r->main
        || slcf->connector->state != NGX_HTTP_SBX_STATE_DEPRECATED)
    {
        return ngx_http_next_header_filter(r);
    }

    c = slcf->connector;

    /* RFC 9745: a structured-field date, the moment it was deprecated */
    h = ngx_list_push(&r->headers_out.headers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    h->hash = 1;
    ngx_str_set(&h->key, "Deprecation");
    h->value.data = ngx_pnalloc(r->pool, NGX_TIME_T_LEN + 1);
    if (h->value.data == NULL) {
        return NGX_ERROR;
    }

    h->value.len = ngx_sprintf(h->value.data, "@%T", c->deprecated)
                   - h->value.data;

    if (c->sunset != NGX_CONF_UNSET) {
        /* RFC 8594: an HTTP-date */
        h = ngx_list_push(&r->headers_out.headers);
        if (h == NULL) {
            return NGX_ERROR;
        }

        h->hash = 1;
        ngx_str_set(&h->key, "Sunset");
        h->value.data = ngx_pnalloc(r->pool,
                                    sizeof("Mon, 28 Sep 1970 06:00:00 GMT"));
        if (h->value.data == NULL) {
            return NGX_ERROR;
        }

        h->value.len = ngx_http_time(h->value.data, c->sunset)
                       - h->value.data;
    }

    return ngx_http_next_header_filter(r);
}


/* ---- variables ---- */

static ngx_int_t
ngx_http_sbx_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_sbx_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_connector_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_sbx_loc_conf_t  *slcf;

    slcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_module);

    if (slcf->connector == NULL) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = slcf->connector->name.len;
    v->data = slcf->connector->name.data;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_decision_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_sbx_ctx_t  *ctx;

    ctx = ngx_http_get_module_ctx(r->main, ngx_http_sbx_module);

    if (ctx == NULL || (!ctx->decided && ctx->connector == NULL)) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->len = ngx_http_sbx_decision_names[ctx->decision].len;
    v->data = ngx_http_sbx_decision_names[ctx->decision].data;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


/* ---- configuration ---- */

static void *
ngx_http_sbx_create_main_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_main_conf_t  *smcf;

    smcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_main_conf_t));
    if (smcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     smcf->helper_path = { 0, NULL };
     */

    smcf->require_pinned = NGX_CONF_UNSET;
    smcf->request_id_index = NGX_CONF_UNSET;

    if (ngx_array_init(&smcf->pools, cf->pool, 4,
                       sizeof(ngx_http_sbx_pool_t *)) != NGX_OK
        || ngx_array_init(&smcf->connectors, cf->pool, 8,
                          sizeof(ngx_http_sbx_connector_t *)) != NGX_OK)
    {
        return NULL;
    }

    return smcf;
}


/*
 * The default helper is the one beside the module file: build/ after
 * `make`, the module directory after `make install`.
 */

static ngx_int_t
ngx_http_sbx_default_helper(ngx_conf_t *cf, ngx_str_t *path)
{
    u_char   *p, *slash;
    size_t    len;
    Dl_info   info;

    if (dladdr((void *) &ngx_http_sbx_module, &info) == 0
        || info.dli_fname == NULL)
    {
        ngx_str_set(path, "/usr/lib/nginx/modules/sbx-lua-helper");
        return NGX_OK;
    }

    slash = (u_char *) strrchr(info.dli_fname, '/');
    len = slash ? (size_t) (slash - (u_char *) info.dli_fname) + 1 : 0;

    p = ngx_pnalloc(cf->pool, len + sizeof("sbx-lua-helper"));
    if (p == NULL) {
        return NGX_ERROR;
    }

    path->data = p;
    p = ngx_cpymem(p, info.dli_fname, len);
    p = ngx_cpymem(p, "sbx-lua-helper", sizeof("sbx-lua-helper") - 1);
    path->len = p - path->data;
    *p = '\0';                  /* access(), posix_spawn() */

    return NGX_OK;
}


static ngx_http_sbx_pool_t *
ngx_http_sbx_new_pool(ngx_conf_t *cf, ngx_http_sbx_main_conf_t *smcf,
    ngx_str_t *name)
{
    ngx_http_sbx_pool_t  *pool, **pp;

    pool = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_pool_t));
    if (pool == NULL) {
        return NULL;
    }

    pool->name = *name;
    pool->index = smcf->pools.nelts;
    pool->size = NGX_HTTP_SBX_DEFAULT_POOL_SIZE;
    pool->queue_max = NGX_HTTP_SBX_DEFAULT_QUEUE;
    pool->pipeline = NGX_HTTP_SBX_DEFAULT_PIPELINE;
    pool->max_requests = NGX_HTTP_SBX_DEFAULT_MAX_REQUESTS;
    pool->memory = NGX_HTTP_SBX_DEFAULT_POOL_MEMORY;

    if (ngx_array_init(&pool->connectors, cf->pool, 4,
                       sizeof(ngx_http_sbx_connector_t *)) != NGX_OK)
    {
        return NULL;
    }

    pp = ngx_array_push(&smcf->pools);
    if (pp == NULL) {
        return NULL;
    }

    *pp = pool;

    return pool;
}


static char *
ngx_http_sbx_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_sbx_main_conf_t  *smcf = conf;

    char                       *rv;
    ngx_str_t                   name;
    ngx_uint_t                  i;
    ngx_http_sbx_pool_t        *pool, **pp;
    ngx_http_sbx_connector_t   *c, **cp;

    ngx_conf_init_value(smcf->require_pinned, 0);

    if (smcf->helper_path.len == 0) {
        if (ngx_http_sbx_default_helper(cf, &smcf->helper_path) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_conf_full_name(cf->cycle, &smcf->helper_path, 0) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    ngx_str_set(&name, "request_id");
    smcf->request_id_index = ngx_http_get_variable_index(cf, &name);
    if (smcf->request_id_index == NGX_ERROR) {
        return NGX_CONF_ERROR;
    }

    /* a pool "default" exists unless redefined */
    ngx_str_set(&name, "default");

    if (ngx_http_sbx_find_pool(smcf, &name) == NULL) {
        if (ngx_http_sbx_new_pool(cf, smcf, &name) == NULL) {
            return NGX_CONF_ERROR;
        }
    }

    cp = smcf->connectors.elts;

    for (i = 0; i < smcf->connectors.nelts; i++) {
        c = cp[i];

        pool = ngx_http_sbx_find_pool(smcf, &c->pool_name);
        if (pool == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown pool \"%V\" in \"pool\" of sbx_connector "
                          "\"%V\" in %s:%ui", &c->pool_name, &c->name,
                          c->conf_file,
                          c->pool_line ? c->pool_line : c->conf_line);
            return NGX_CONF_ERROR;
        }

        if (c->memory * 2 > pool->memory) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"limits memory=%uzm\" of sbx_connector \"%V\" "
                          "must be at most half of the memory of pool "
                          "\"%V\" (%uzm) in %s:%ui", c->memory >> 20,
                          &c->name, &pool->name, pool->memory >> 20,
                          c->conf_file,
                          c->limits_line ? c->limits_line : c->conf_line);
            return NGX_CONF_ERROR;
        }

        if (smcf->require_pinned && c->pinned.len == 0) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "sbx_connector \"%V\" has no \"sha256\" but "
                          "\"sbx_require_pinned\" is on in %s:%ui", &c->name,
                          c->conf_file, c->conf_line);
            return NGX_CONF_ERROR;
        }

        c->pool = pool;
        c->index = pool->connectors.nelts;

        cp = ngx_array_push(&pool->connectors);
        if (cp == NULL) {
            return NGX_CONF_ERROR;
        }

        *cp = c;
        cp = smcf->connectors.elts;

        /* compile and check the script now that the helper is known */
        rv = ngx_http_sbx_script_load(cf, smcf, c);
        if (rv != NGX_CONF_OK) {
            return rv;
        }
    }

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        pool = pp[i];
        ngx_queue_init(&pool->queue);
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_sbx_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_loc_conf_t  *slcf;

    slcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_loc_conf_t));
    if (slcf == NULL) {
        return NULL;
    }

    slcf->connector = NGX_CONF_UNSET_PTR;
    slcf->content = NGX_CONF_UNSET;

    return slcf;
}


/* the catalog lists the locations that use a connector */

static ngx_int_t
ngx_http_sbx_add_route(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    u_char                    *p;
    ngx_str_t                 *route;
    ngx_http_core_loc_conf_t  *clcf;

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->name.len == 0) {
        return NGX_OK;
    }

    if (c->routes.elts == NULL
        && ngx_array_init(&c->routes, cf->pool, 2, sizeof(ngx_str_t))
           != NGX_OK)
    {
        return NGX_ERROR;
    }

    route = ngx_array_push(&c->routes);
    if (route == NULL) {
        return NGX_ERROR;
    }

    p = ngx_pnalloc(cf->pool, clcf->name.len + 2);
    if (p == NULL) {
        return NGX_ERROR;
    }

    route->data = p;

#if (NGX_PCRE)
    if (clcf->regex) {
        p = ngx_cpymem(p, "~ ", 2);

    } else
#endif
    if (clcf->exact_match) {
        p = ngx_cpymem(p, "= ", 2);
    }

    p = ngx_cpymem(p, clcf->name.data, clcf->name.len);
    route->len = p - route->data;

    return NGX_OK;
}


static char *
ngx_http_sbx_merge_loc_conf(ngx_conf_t *cf, void *parent, void *child)
{
    ngx_http_sbx_loc_conf_t *prev = parent;
    ngx_http_sbx_loc_conf_t *conf = child;

    ngx_uint_t                 i;
    ngx_http_sbx_ref_t        *ref;
    ngx_http_core_loc_conf_t  *clcf;
    ngx_http_sbx_main_conf_t  *smcf;
    ngx_http_sbx_connector_t **cp;

    if (conf->connector == NGX_CONF_UNSET_PTR) {
        conf->connector = prev->connector == NGX_CONF_UNSET_PTR
                          ? NULL : prev->connector;
        conf->ref = prev->ref;
    }

    if (conf->connector == NULL && conf->ref) {
        /* resolve the name now that every connector is declared */
        ref = conf->ref;
        smcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_sbx_module);
        cp = smcf->connectors.elts;

        for (i = 0; i < smcf->connectors.nelts; i++) {
            if (cp[i]->name.len == ref->name.len
                && ngx_strncmp(cp[i]->name.data, ref->name.data,
                               ref->name.len) == 0)
            {
                conf->connector = cp[i];
                break;
            }
        }

        if (conf->connector == NULL) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "unknown connector \"%V\" in \"sbx_connector\" "
                          "in %s:%ui", &ref->name, ref->file, ref->line);
            return NGX_CONF_ERROR;
        }

        if (ngx_http_sbx_add_route(cf, conf->connector) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    if (conf->connector == NULL) {
        conf->content = 0;
        return NGX_CONF_OK;
    }

    clcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_core_module);

    if (clcf->handler == NULL
        || clcf->handler == ngx_http_sbx_content_handler)
    {
        /* content mode: the script's request hook answers */
        clcf->handler = ngx_http_sbx_content_handler;
        conf->content = 1;
        return NGX_CONF_OK;
    }

    /*
     * connector mode: the request and response hooks run around the
     * location's own handler (ngx_http_sbx_connector.c)
     */
    conf->content = 0;

    return NGX_CONF_OK;
}


static ngx_int_t
ngx_http_sbx_postconfiguration(ngx_conf_t *cf)
{
    ngx_http_handler_pt        *h;
    ngx_http_core_main_conf_t  *cmcf;

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_PREACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_preaccess_handler;

    ngx_http_next_header_filter = ngx_http_top_header_filter;
    ngx_http_top_header_filter = ngx_http_sbx_header_filter;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_init_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_main_conf_t  *smcf;

    smcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_sbx_module);

    if (smcf == NULL || smcf->connectors.nelts == 0) {
        return NGX_OK;
    }

    return ngx_http_sbx_pool_init_process(cycle, smcf);
}


static void
ngx_http_sbx_exit_process(ngx_cycle_t *cycle)
{
    ngx_http_sbx_main_conf_t  *smcf;

    smcf = ngx_http_cycle_get_module_main_conf(cycle, ngx_http_sbx_module);

    if (smcf == NULL || smcf->connectors.nelts == 0) {
        return;
    }

    ngx_http_sbx_pool_exit_process(cycle, smcf);
}


/* ---- directives ---- */

static ngx_http_sbx_pool_t *
ngx_http_sbx_find_pool(ngx_http_sbx_main_conf_t *smcf, ngx_str_t *name)
{
    ngx_uint_t             i;
    ngx_http_sbx_pool_t  **pp;

    pp = smcf->pools.elts;

    for (i = 0; i < smcf->pools.nelts; i++) {
        if (pp[i]->name.len == name->len
            && ngx_strncmp(pp[i]->name.data, name->data, name->len) == 0)
        {
            return pp[i];
        }
    }

    return NULL;
}


static ngx_int_t
ngx_http_sbx_param_num(ngx_str_t *v, size_t skip, ngx_uint_t min,
    ngx_uint_t max, ngx_uint_t *out)
{
    ngx_int_t  n;

    n = ngx_atoi(v->data + skip, v->len - skip);

    if (n == NGX_ERROR || (ngx_uint_t) n < min || (ngx_uint_t) n > max) {
        return NGX_ERROR;
    }

    *out = (ngx_uint_t) n;

    return NGX_OK;
}


/*
 * The "key=value" parameters from cf->args[from] on name each key once:
 * "duplicate "timeout=" in "sbx_redis" (each parameter may be given
 * once)" rather than a silent "last one wins".
 */

ngx_int_t
ngx_http_sbx_params_unique(ngx_conf_t *cf, ngx_uint_t from)
{
    u_char      *eq, *eq2;
    size_t       len;
    ngx_str_t   *value;
    ngx_uint_t   i, j;

    value = cf->args->elts;

    for (i = from; i < cf->args->nelts; i++) {
        eq = ngx_strlchr(value[i].data, value[i].data + value[i].len, '=');

        if (eq == NULL) {
            continue;
        }

        len = eq - value[i].data + 1;

        for (j = from; j < i; j++) {
            eq2 = ngx_strlchr(value[j].data, value[j].data + value[j].len,
                              '=');

            if (eq2 && (size_t) (eq2 - value[j].data + 1) == len
                && ngx_strncmp(value[j].data, value[i].data, len) == 0)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "duplicate \"%*s\" in \"%V\" (each "
                                   "parameter may be given once)", len,
                                   value[i].data, &value[0]);
                return NGX_ERROR;
            }
        }
    }

    return NGX_OK;
}


/*
 * ngx_conf_set_enum_slot() that names the directive and lists the values:
 * "invalid value "maybe" in "sbx_residency_unknown" (expected allow or
 * deny)" instead of nginx's bare "invalid value "maybe"".
 */

char *
ngx_http_sbx_conf_set_enum(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    u_char           *p, *last, buf[256];
    ngx_str_t        *value;
    ngx_uint_t        i, *np;
    ngx_conf_enum_t  *e;

    np = (ngx_uint_t *) ((char *) conf + cmd->offset);

    if (*np != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    value = cf->args->elts;
    e = cmd->post;

    for (i = 0; e[i].name.len; i++) {
        if (e[i].name.len == value[1].len
            && ngx_strcmp(e[i].name.data, value[1].data) == 0)
        {
            *np = e[i].value;
            return NGX_CONF_OK;
        }
    }

    p = buf;
    last = buf + sizeof(buf);

    for (i = 0; e[i].name.len; i++) {
        p = ngx_slprintf(p, last, "%s%V", i == 0 ? ""
                         : e[i + 1].name.len ? ", " : " or ", &e[i].name);
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid value \"%V\" in \"%V\" (expected %*s)",
                       &value[1], &cmd->name, p - buf, buf);

    return NGX_CONF_ERROR;
}


/* connector and pool names: 1 to 64 of A-Z a-z 0-9 _ - . */

static ngx_int_t
ngx_http_sbx_name_ok(ngx_str_t *name)
{
    ngx_uint_t  i;

    if (name->len == 0 || name->len > 64) {
        return NGX_ERROR;
    }

    for (i = 0; i < name->len; i++) {
        if (!(isalnum(name->data[i]) || name->data[i] == '_'
              || name->data[i] == '-' || name->data[i] == '.'))
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static char *
ngx_http_sbx_pool_directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_main_conf_t  *smcf = conf;

    ssize_t               size;
    ngx_str_t            *value, s;
    ngx_uint_t            i, have_size = 0;
    ngx_http_sbx_pool_t  *pool;

    value = cf->args->elts;

    if (ngx_strlchr(value[1].data, value[1].data + value[1].len, '=')) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_pool\" needs a name before its "
                           "parameters (expected \"sbx_pool NAME size=N "
                           "...\")");
        return NGX_CONF_ERROR;
    }

    if (ngx_http_sbx_name_ok(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"sbx_pool\" name \"%V\" (expected 1 to "
                           "64 letters, digits, \"_\", \"-\" and \".\")",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_sbx_find_pool(smcf, &value[1]) != NULL) {
        return "is duplicate";
    }

    if (ngx_http_sbx_params_unique(cf, 2) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    pool = ngx_http_sbx_new_pool(cf, smcf, &value[1]);
    if (pool == NULL) {
        return NGX_CONF_ERROR;
    }

    pool->conf_file = cf->conf_file->file.name.data;
    pool->conf_line = cf->conf_file->line;

    for (i = 2; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "size=", 5) == 0) {
            if (ngx_http_sbx_param_num(&value[i], 5, 1,
                                       NGX_HTTP_SBX_MAX_POOL_SIZE,
                                       &pool->size) != NGX_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"sbx_pool\" size \"%V\" "
                                   "(expected 1 to %d)",
                                   &value[i], NGX_HTTP_SBX_MAX_POOL_SIZE);
                return NGX_CONF_ERROR;
            }

            have_size = 1;
            continue;
        }

        if (ngx_strncmp(value[i].data, "queue=", 6) == 0) {
            if (ngx_http_sbx_param_num(&value[i], 6, 0, 1000000,
                                       &pool->queue_max) != NGX_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"sbx_pool\" queue \"%V\" "
                                   "(expected 0 to 1000000)", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "pipeline=", 9) == 0) {
            if (ngx_http_sbx_param_num(&value[i], 9, 1,
                                       NGX_HTTP_SBX_MAX_PIPELINE,
                                       &pool->pipeline) != NGX_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"sbx_pool\" pipeline \"%V\" "
                                   "(expected 1 to %d)", &value[i],
                                   NGX_HTTP_SBX_MAX_PIPELINE);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "max_requests=", 13) == 0) {
            if (ngx_http_sbx_param_num(&value[i], 13, 0, NGX_MAX_INT_T_VALUE,
                                       &pool->max_requests) != NGX_OK)
            {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"sbx_pool\" max_requests "
                                   "\"%V\" (expected a number, 0 for no "
                                   "limit)", &value[i]);
                return NGX_CONF_ERROR;
            }

            continue;
        }

        if (ngx_strncmp(value[i].data, "memory=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;

            size = ngx_parse_size(&s);

            if (size == NGX_ERROR || size < 64 * 1024 * 1024) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"sbx_pool\" memory \"%V\" "
                                   "(expected a size of at least 64m, "
                                   "in k or m)", &value[i]);
                return NGX_CONF_ERROR;
            }

            pool->memory = (size_t) size;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"sbx_pool\" parameter \"%V\" (expected "
                           "size=, queue=, pipeline=, max_requests= or "
                           "memory=)", &value[i]);
        return NGX_CONF_ERROR;
    }

    if (!have_size) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_pool\" needs \"size=N\"");
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_connector_block(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_main_conf_t  *smcf = conf;

    char                       *rv;
    ngx_str_t                  *value;
    ngx_uint_t                  i;
    ngx_conf_t                  save;
    ngx_http_sbx_connector_t   *c, **cp;

    value = cf->args->elts;

    cp = smcf->connectors.elts;

    for (i = 0; i < smcf->connectors.nelts; i++) {
        if (cp[i]->name.len == value[1].len
            && ngx_strncmp(cp[i]->name.data, value[1].data, value[1].len)
               == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "duplicate \"sbx_connector\" \"%V\", first "
                               "declared in %s:%ui", &value[1],
                               cp[i]->conf_file, cp[i]->conf_line);
            return NGX_CONF_ERROR;
        }
    }

    if (ngx_http_sbx_name_ok(&value[1]) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid connector name \"%V\" (expected 1 to "
                           "64 letters, digits, \"_\", \"-\" and \".\")",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    c = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_connector_t));
    if (c == NULL) {
        return NGX_CONF_ERROR;
    }

    c->name = value[1];
    c->seq = smcf->connectors.nelts;
    c->state = NGX_CONF_UNSET_UINT;
    c->sunset = NGX_CONF_UNSET;
    c->memory = NGX_CONF_UNSET_SIZE;
    c->instructions = NGX_CONF_UNSET_UINT;
    c->timeout = NGX_CONF_UNSET_MSEC;
    c->conf_file = cf->conf_file->file.name.data;
    c->conf_line = cf->conf_file->line;
    c->deprecated = ngx_time();

    save = *cf;
    cf->handler = ngx_http_sbx_connector_body;
    cf->handler_conf = (char *) c;

    rv = ngx_conf_parse(cf, NULL);

    *cf = save;

    if (rv != NGX_CONF_OK) {
        return rv;
    }

    if (c->script.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "sbx_connector \"%V\" has no \"script\"",
                           &c->name);
        return NGX_CONF_ERROR;
    }

    ngx_conf_init_uint_value(c->state, NGX_HTTP_SBX_STATE_GA);
    ngx_conf_init_size_value(c->memory, 32 * 1024 * 1024);
    ngx_conf_init_uint_value(c->instructions, 10000000);
    ngx_conf_init_msec_value(c->timeout, 500);

    if (c->pool_name.len == 0) {
        ngx_str_set(&c->pool_name, "default");
    }

    cp = ngx_array_push(&smcf->connectors);
    if (cp == NULL) {
        return NGX_CONF_ERROR;
    }

    *cp = c;

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_set_text(ngx_conf_t *cf, ngx_str_t *field, ngx_str_t *value)
{
    if (field->data) {
        return "is duplicate";
    }

    if (cf->args->nelts != 2) {
        return "takes one value";
    }

    *field = *value;

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_set_limits(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    ssize_t      size;
    ngx_int_t    n;
    ngx_str_t   *value, s;
    ngx_uint_t   i;
    ngx_msec_t   ms;

    value = cf->args->elts;

    if (cf->args->nelts < 2) {
        return "needs memory=SIZE, instructions=N or timeout=TIME";
    }

    if (ngx_http_sbx_params_unique(cf, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {

        if (ngx_strncmp(value[i].data, "memory=", 7) == 0) {
            s.data = value[i].data + 7;
            s.len = value[i].len - 7;
            size = ngx_parse_size(&s);

            if (size == NGX_ERROR || size < 256 * 1024) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"limits\" memory \"%V\" "
                                   "(expected a size of at least 256k, "
                                   "in k or m)", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->memory = (size_t) size;
            continue;
        }

        if (ngx_strncmp(value[i].data, "instructions=", 13) == 0) {
            n = ngx_atoi(value[i].data + 13, value[i].len - 13);

            if (n == NGX_ERROR || n < 1000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"limits\" instructions "
                                   "\"%V\" (expected a "
                                   "number of at least 1000)", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->instructions = (ngx_uint_t) n;
            continue;
        }

        if (ngx_strncmp(value[i].data, "timeout=", 8) == 0) {
            s.data = value[i].data + 8;
            s.len = value[i].len - 8;
            ms = ngx_parse_time(&s, 0);

            if (ms == (ngx_msec_t) NGX_ERROR || ms == 0 || ms > 60000) {
                ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                                   "invalid \"limits\" timeout \"%V\" "
                                   "(expected a time "
                                   "from 1ms to 60s)", &value[i]);
                return NGX_CONF_ERROR;
            }

            c->timeout = ms;
            continue;
        }

        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid \"limits\" parameter \"%V\" (expected "
                           "memory=, instructions= or timeout=)", &value[i]);
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_set_capabilities(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    ngx_str_t   *value, *name;
    ngx_uint_t   i, k;

    static struct {
        ngx_str_t   name;
        uint32_t    cap;
    } caps[] = {
        { ngx_string("json"), SBX_CAP_JSON },
        { ngx_string("base64"), SBX_CAP_BASE64 },
        { ngx_string("hex"), SBX_CAP_HEX },
        { ngx_string("sha256"), SBX_CAP_SHA256 },
        { ngx_string("hmac"), SBX_CAP_HMAC },
        { ngx_string("log"), SBX_CAP_LOG },
        { ngx_null_string, 0 }
    };

    if (c->cap_names) {
        return "is duplicate";
    }

    if (cf->args->nelts < 2) {
        return "needs at least one name (expected json, base64, hex, "
               "sha256, hmac or log)";
    }

    value = cf->args->elts;

    c->cap_names = ngx_array_create(cf->pool, cf->args->nelts,
                                    sizeof(ngx_str_t));
    if (c->cap_names == NULL) {
        return NGX_CONF_ERROR;
    }

    for (i = 1; i < cf->args->nelts; i++) {
        for (k = 0; caps[k].name.len; k++) {
            if (caps[k].name.len == value[i].len
                && ngx_strncmp(caps[k].name.data, value[i].data,
                               value[i].len) == 0)
            {
                break;
            }
        }

        if (caps[k].name.len == 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "unknown capability \"%V\" (known: json, "
                               "base64, hex, sha256, hmac, log)", &value[i]);
            return NGX_CONF_ERROR;
        }

        if (c->caps & caps[k].cap) {
            continue;
        }

        c->caps |= caps[k].cap;

        name = ngx_array_push(c->cap_names);
        if (name == NULL) {
            return NGX_CONF_ERROR;
        }

        *name = caps[k].name;
    }

    return NGX_CONF_OK;
}


/* days from the civil date, proleptic Gregorian calendar */

static time_t
ngx_http_sbx_timegm(ngx_int_t y, ngx_int_t m, ngx_int_t d)
{
    ngx_int_t  era, yoe, doy, doe;

    y -= m <= 2;
    era = y / 400;
    yoe = y - era * 400;
    doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;

    return (time_t) (era * 146097 + doe - 719468) * 86400;
}


/* an HTTP-date (IMF-fixdate), or YYYY-MM-DD (midnight UTC); else NGX_ERROR */

static time_t
ngx_http_sbx_parse_date(ngx_str_t *v)
{
    u_char     buf[sizeof("Mon, 28 Sep 1970 06:00:00 GMT")];
    time_t     t;
    ngx_tm_t   tm;
    ngx_int_t  y, mo, d;

    /*
     * A date that does not exist (2027-02-30) or a wrong weekday is a
     * mistake, not a date to shift: each form must come back unchanged
     * when the time is written out again.
     */

    if (v->len == 10 && v->data[4] == '-' && v->data[7] == '-') {
        y = ngx_atoi(v->data, 4);
        mo = ngx_atoi(v->data + 5, 2);
        d = ngx_atoi(v->data + 8, 2);

        if (y < 1970 || y > 9999 || mo < 1 || mo > 12 || d < 1 || d > 31) {
            return NGX_ERROR;
        }

        t = ngx_http_sbx_timegm(y, mo, d);
        ngx_gmtime(t, &tm);

        if (tm.ngx_tm_year != y || tm.ngx_tm_mon != mo
            || tm.ngx_tm_mday != d)
        {
            return NGX_ERROR;
        }

        return t;
    }

    t = ngx_parse_http_time(v->data, v->len);

    if (t == NGX_ERROR || v->len != sizeof(buf) - 1) {
        return NGX_ERROR;
    }

    (void) ngx_http_time(buf, t);

    return ngx_strncmp(buf, v->data, v->len) == 0 ? t : NGX_ERROR;
}


/*
 * state beta|ga|deprecated|retired;  "state deprecated DATE;" also says
 * since when (the Deprecation header); without a date it is the time
 * nginx read the configuration.
 */

static char *
ngx_http_sbx_set_state(ngx_conf_t *cf, ngx_http_sbx_connector_t *c)
{
    time_t       t;
    ngx_str_t   *value;
    ngx_uint_t   i;

    value = cf->args->elts;

    if (cf->args->nelts < 2 || cf->args->nelts > 3) {
        goto invalid;
    }

    if (c->state != NGX_CONF_UNSET_UINT) {
        return "is duplicate";
    }

    for (i = 0; ngx_http_sbx_state_names[i].len; i++) {
        if (ngx_http_sbx_state_names[i].len == value[1].len
            && ngx_strncmp(ngx_http_sbx_state_names[i].data,
                           value[1].data, value[1].len) == 0)
        {
            break;
        }
    }

    if (ngx_http_sbx_state_names[i].len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid state \"%V\" (expected beta, ga, "
                           "deprecated or retired)", &value[1]);
        return NGX_CONF_ERROR;
    }

    if (cf->args->nelts == 3 && i == NGX_HTTP_SBX_STATE_DEPRECATED) {
        t = ngx_http_sbx_parse_date(&value[2]);

        if (t == NGX_ERROR) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "invalid date \"%V\" in \"state deprecated\" "
                               "(expected an HTTP-date or YYYY-MM-DD)",
                               &value[2]);
            return NGX_CONF_ERROR;
        }

        c->deprecated = t;

    } else if (cf->args->nelts != 2) {
        goto invalid;
    }

    c->state = i;

    return NGX_CONF_OK;

invalid:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid number of arguments in \"state\" directive "
                       "(expected \"state beta|ga|retired;\" or "
                       "\"state deprecated [DATE];\")");
    return NGX_CONF_ERROR;
}


static char *
ngx_http_sbx_set_sunset(ngx_conf_t *cf, ngx_http_sbx_connector_t *c,
    ngx_str_t *v)
{
    time_t  t;

    if (c->sunset != NGX_CONF_UNSET) {
        return "is duplicate";
    }

    t = ngx_http_sbx_parse_date(v);

    if (t == NGX_ERROR) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid sunset \"%V\" (expected an HTTP-date or "
                           "YYYY-MM-DD)", v);
        return NGX_CONF_ERROR;
    }

    c->sunset = t;

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_connector_body(ngx_conf_t *cf, ngx_command_t *dummy, void *conf)
{
    ngx_http_sbx_connector_t  *c = (ngx_http_sbx_connector_t *) conf;

    char        *rv;
    ngx_str_t   *value;
    ngx_uint_t   i;

    value = cf->args->elts;

#define ngx_http_sbx_is(s)                                                   \
    (value[0].len == sizeof(s) - 1                                           \
     && ngx_strncmp(value[0].data, s, sizeof(s) - 1) == 0)

    if (ngx_http_sbx_is("capabilities")) {
        rv = ngx_http_sbx_set_capabilities(cf, c);
        goto done;
    }

    if (ngx_http_sbx_is("limits")) {
        c->limits_line = cf->conf_file->line;
        rv = ngx_http_sbx_set_limits(cf, c);
        goto done;
    }

    if (ngx_http_sbx_is("state")) {
        rv = ngx_http_sbx_set_state(cf, c);
        goto done;
    }

    if (!(ngx_http_sbx_is("script") || ngx_http_sbx_is("sha256")
          || ngx_http_sbx_is("version") || ngx_http_sbx_is("owner")
          || ngx_http_sbx_is("description") || ngx_http_sbx_is("pool")
          || ngx_http_sbx_is("sunset")))
    {
        goto unknown;
    }

    if (cf->args->nelts != 2) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid number of arguments in \"%V\" in "
                           "sbx_connector block (expected \"%V VALUE;\")",
                           &value[0], &value[0]);
        return NGX_CONF_ERROR;
    }

    if (ngx_http_sbx_is("script")) {
        rv = ngx_http_sbx_set_text(cf, &c->script, &value[1]);

        if (rv == NGX_CONF_OK
            && ngx_conf_full_name(cf->cycle, &c->script, 1) != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        c->script_line = cf->conf_file->line;
        goto done;
    }

    if (ngx_http_sbx_is("sha256")) {
        if (value[1].len != 64) {
            goto bad_digest;
        }

        for (i = 0; i < 64; i++) {
            if (!isxdigit(value[1].data[i])) {
                goto bad_digest;
            }

            value[1].data[i] = ngx_tolower(value[1].data[i]);
        }

        c->sha256_line = cf->conf_file->line;
        rv = ngx_http_sbx_set_text(cf, &c->pinned, &value[1]);
        goto done;
    }

    if (ngx_http_sbx_is("version")) {
        rv = ngx_http_sbx_set_text(cf, &c->version, &value[1]);
        goto done;
    }

    if (ngx_http_sbx_is("owner")) {
        rv = ngx_http_sbx_set_text(cf, &c->owner, &value[1]);
        goto done;
    }

    if (ngx_http_sbx_is("description")) {
        rv = ngx_http_sbx_set_text(cf, &c->description, &value[1]);
        goto done;
    }

    if (ngx_http_sbx_is("pool")) {
        c->pool_line = cf->conf_file->line;
        rv = ngx_http_sbx_set_text(cf, &c->pool_name, &value[1]);
        goto done;
    }

    if (ngx_http_sbx_is("sunset")) {
        rv = ngx_http_sbx_set_sunset(cf, c, &value[1]);
        goto done;
    }

#undef ngx_http_sbx_is

unknown:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "unknown directive \"%V\" in sbx_connector block "
                       "(expected script, sha256, version, owner, "
                       "description, state, sunset, capabilities, limits or "
                       "pool)", &value[0]);
    return NGX_CONF_ERROR;

bad_digest:

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                       "invalid \"sha256\" \"%V\" (expected 64 hex digits)",
                       &value[1]);
    return NGX_CONF_ERROR;

done:

    if (rv == NGX_CONF_OK || rv == NGX_CONF_ERROR) {
        return rv;
    }

    ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "\"%V\" directive %s",
                       &value[0], rv);
    return NGX_CONF_ERROR;
}


static char *
ngx_http_sbx_connector_location(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf)
{
    ngx_http_sbx_loc_conf_t  *slcf = conf;

    ngx_str_t           *value;
    ngx_http_sbx_ref_t  *ref;

    if (slcf->ref) {
        return "is duplicate";
    }

    value = cf->args->elts;

    ref = ngx_palloc(cf->pool, sizeof(ngx_http_sbx_ref_t));
    if (ref == NULL) {
        return NGX_CONF_ERROR;
    }

    ref->name = value[1];
    ref->file = cf->conf_file->file.name.data;
    ref->line = cf->conf_file->line;

    slcf->ref = ref;
    slcf->connector = NULL;     /* resolved in merge */

    return NGX_CONF_OK;
}
