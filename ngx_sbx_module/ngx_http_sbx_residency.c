/*
 * ngx_http_sbx_residency.c: data residency (DESIGN.md sections 4 and 6).
 *
 * sbx_geoip_db opens a MaxMind DB with libmaxminddb (mmap) while the
 * configuration is parsed; the handle belongs to the configuration cycle
 * and is closed by a cleanup of its pool, so a reload opens the replaced
 * file and old workers keep answering from the old one until they exit.
 *
 * sbx_residency rules are resolved once the whole http block is known
 * (groups and the database may be declared after a location that uses
 * them): each rule becomes a bitmap of countries and a list of
 * subdivisions.  The access-phase handler looks the client address up
 * (the one realip settled on), walks the rules, first match wins, and
 * answers 451 residency_denied.
 */

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <maxminddb.h>

#include "ngx_http_sbx_module.h"


#define NGX_HTTP_SBX_RESIDENCY_DENY      0
#define NGX_HTTP_SBX_RESIDENCY_ALLOW     1

/*
 * $sbx_residency; not NGX_HTTP_SBX_RESIDENCY_DENIED, which is the decision
 * of ngx_http_sbx_module.h that ngx_http_sbx_send_error() takes
 */
#define NGX_HTTP_SBX_RESULT_NONE         0
#define NGX_HTTP_SBX_RESULT_ALLOWED      1
#define NGX_HTTP_SBX_RESULT_DENIED       2
#define NGX_HTTP_SBX_RESULT_DRY_RUN      3

/* one bit per pair of letters AA..ZZ */
#define NGX_HTTP_SBX_CC_BITS             (26 * 26)
#define NGX_HTTP_SBX_CC_BYTES            ((NGX_HTTP_SBX_CC_BITS + 7) / 8)

#define NGX_HTTP_SBX_GROUP_DEPTH         8
#define NGX_HTTP_SBX_SUBDIVISIONS_MAX    4


typedef struct {
    ngx_str_t                     name;
    ngx_array_t                   members;        /* ngx_str_t */
    ngx_flag_t                    builtin;
    u_char                       *conf_file;
    ngx_uint_t                    conf_line;
} ngx_http_sbx_country_group_t;


typedef struct {
    u_char                        country[2];
    ngx_str_t                     code;           /* "BY" of "DE-BY" */
} ngx_http_sbx_subdivision_t;


typedef struct {
    ngx_uint_t                    allow;
    ngx_array_t                   names;          /* ngx_str_t, as written */
    u_char                        countries[NGX_HTTP_SBX_CC_BYTES];
    ngx_array_t                   subdivisions;   /* subdivision_t */
    ngx_str_t                     text;           /* "deny eu CH" */
    u_char                       *conf_file;
    ngx_uint_t                    conf_line;
} ngx_http_sbx_residency_rule_t;


typedef struct {
    ngx_array_t                   rules;          /* rule_t */
    ngx_flag_t                    has_allow;
    ngx_flag_t                    subdivisions;   /* some rule names one */
    ngx_flag_t                    resolved;
} ngx_http_sbx_residency_rules_t;


typedef struct {
    MMDB_s                        mmdb;
    ngx_flag_t                    opened;
    ngx_str_t                     db_path;
    ngx_str_t                     db_type;
    ngx_str_t                     build_epoch;    /* decimal, for logs */
    ngx_flag_t                    has_subdivisions;
    ngx_array_t                   groups;         /* country_group_t */
} ngx_http_sbx_residency_main_conf_t;


typedef struct {
    ngx_http_sbx_residency_rules_t  *rules;       /* NULL: off */
    ngx_uint_t                    unknown;
    ngx_flag_t                    dry_run;
    ngx_uint_t                    log_level;
} ngx_http_sbx_residency_loc_conf_t;


typedef struct {
    ngx_uint_t                    result;         /* $sbx_residency */
} ngx_http_sbx_residency_ctx_t;


typedef struct {
    ngx_uint_t                    n;
    ngx_str_t                     code[NGX_HTTP_SBX_SUBDIVISIONS_MAX];
} ngx_http_sbx_geo_subdivisions_t;


static ngx_int_t ngx_http_sbx_residency_handler(ngx_http_request_t *r);
static ngx_int_t ngx_http_sbx_residency_locate(ngx_http_request_t *r,
    ngx_http_sbx_residency_main_conf_t *rmcf, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_geo_subdivisions_t *sd);
static ngx_int_t ngx_http_sbx_residency_copy(ngx_http_request_t *r,
    MMDB_entry_s *entry, const char *const *path, ngx_str_t *out);
static ngx_int_t ngx_http_sbx_residency_string(MMDB_entry_s *entry,
    const char *const *path, ngx_str_t *out);
static ngx_http_sbx_residency_rule_t *ngx_http_sbx_residency_match(
    ngx_http_sbx_residency_rules_t *rules, ngx_str_t *country,
    ngx_http_sbx_geo_subdivisions_t *sd);

static ngx_int_t ngx_http_sbx_country_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_sbx_residency_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);
static ngx_int_t ngx_http_sbx_geoip_epoch_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data);

static ngx_int_t ngx_http_sbx_residency_add_variables(ngx_conf_t *cf);
static void *ngx_http_sbx_residency_create_main_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_residency_init_main_conf(ngx_conf_t *cf,
    void *conf);
static void *ngx_http_sbx_residency_create_loc_conf(ngx_conf_t *cf);
static char *ngx_http_sbx_residency_merge_loc_conf(ngx_conf_t *cf,
    void *parent, void *child);
static ngx_int_t ngx_http_sbx_residency_init(ngx_conf_t *cf);

static char *ngx_http_sbx_geoip_db(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static ngx_int_t ngx_http_sbx_mmdb_has_country(MMDB_s *mmdb);
static char *ngx_http_sbx_country_group(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);
static char *ngx_http_sbx_residency(ngx_conf_t *cf, ngx_command_t *cmd,
    void *conf);

static ngx_int_t ngx_http_sbx_add_group(ngx_conf_t *cf,
    ngx_http_sbx_residency_main_conf_t *rmcf, ngx_str_t *name,
    ngx_str_t *members, ngx_uint_t n, ngx_flag_t builtin);
static ngx_http_sbx_country_group_t *ngx_http_sbx_find_group(
    ngx_http_sbx_residency_main_conf_t *rmcf, ngx_str_t *name);
static ngx_int_t ngx_http_sbx_expand(ngx_conf_t *cf,
    ngx_http_sbx_residency_main_conf_t *rmcf,
    ngx_http_sbx_residency_rule_t *rule, ngx_str_t *name, ngx_uint_t depth,
    u_char *file, ngx_uint_t line, const char *directive);
static ngx_int_t ngx_http_sbx_resolve_rules(ngx_conf_t *cf,
    ngx_http_sbx_residency_rules_t *rules);
static ngx_flag_t ngx_http_sbx_is_country(ngx_str_t *s);
static ngx_flag_t ngx_http_sbx_is_subdivision(ngx_str_t *s);
static ngx_flag_t ngx_http_sbx_looks_like_code(ngx_str_t *s);
static void ngx_http_sbx_cleanup_mmdb(void *data);


/*
 * ISO 3166-1 alpha-2 codes in use, plus XK (Kosovo), which MaxMind
 * databases carry.
 */
static const char  ngx_http_sbx_iso3166[] =
    "ADAEAFAGAIALAMAOAQARASATAUAWAXAZ"
    "BABBBDBEBFBGBHBIBJBLBMBNBOBQBRBSBTBVBWBYBZ"
    "CACCCDCFCGCHCICKCLCMCNCOCRCUCVCWCXCYCZ"
    "DEDJDKDMDODZ"
    "ECEEEGEHERESET"
    "FIFJFKFMFOFR"
    "GAGBGDGEGFGGGHGIGLGMGNGPGQGRGSGTGUGWGY"
    "HKHMHNHRHTHU"
    "IDIEILIMINIOIQIRISIT"
    "JEJMJOJP"
    "KEKGKHKIKMKNKPKRKWKYKZ"
    "LALBLCLILKLRLSLTLULVLY"
    "MAMCMDMEMFMGMHMKMLMMMNMOMPMQMRMSMTMUMVMWMXMYMZ"
    "NANCNENFNGNINLNONPNRNUNZ"
    "OM"
    "PAPEPFPGPHPKPLPMPNPRPSPTPWPY"
    "QA"
    "RERORSRURW"
    "SASBSCSDSESGSHSISJSKSLSMSNSOSRSSSTSVSXSYSZ"
    "TCTDTFTGTHTJTKTLTMTNTOTRTTTVTWTZ"
    "UAUGUMUSUYUZ"
    "VAVCVEVGVIVNVU"
    "WFWS"
    "XK"
    "YEYT"
    "ZAZMZW";


/* built-in groups; sbx_country_group may redefine them */
static ngx_str_t  ngx_http_sbx_group_eu[] = {
    ngx_string("AT"), ngx_string("BE"), ngx_string("BG"), ngx_string("HR"),
    ngx_string("CY"), ngx_string("CZ"), ngx_string("DK"), ngx_string("EE"),
    ngx_string("FI"), ngx_string("FR"), ngx_string("DE"), ngx_string("GR"),
    ngx_string("HU"), ngx_string("IE"), ngx_string("IT"), ngx_string("LV"),
    ngx_string("LT"), ngx_string("LU"), ngx_string("MT"), ngx_string("NL"),
    ngx_string("PL"), ngx_string("PT"), ngx_string("RO"), ngx_string("SK"),
    ngx_string("SI"), ngx_string("ES"), ngx_string("SE")
};

static ngx_str_t  ngx_http_sbx_group_eea[] = {
    ngx_string("eu"), ngx_string("IS"), ngx_string("LI"), ngx_string("NO")
};


static const char *ngx_http_sbx_path_country[] =
    { "country", "iso_code", NULL };
static const char *ngx_http_sbx_path_continent[] =
    { "continent", "code", NULL };


static ngx_conf_enum_t  ngx_http_sbx_residency_unknown[] = {
    { ngx_string("deny"), NGX_HTTP_SBX_RESIDENCY_DENY },
    { ngx_string("allow"), NGX_HTTP_SBX_RESIDENCY_ALLOW },
    { ngx_null_string, 0 }
};


static ngx_conf_enum_t  ngx_http_sbx_residency_log_levels[] = {
    { ngx_string("info"), NGX_LOG_INFO },
    { ngx_string("notice"), NGX_LOG_NOTICE },
    { ngx_string("warn"), NGX_LOG_WARN },
    { ngx_string("error"), NGX_LOG_ERR },
    { ngx_null_string, 0 }
};


static ngx_str_t  ngx_http_sbx_residency_results[] = {
    ngx_null_string,
    ngx_string("allowed"),
    ngx_string("denied"),
    ngx_string("dry_run"),
};


static ngx_command_t  ngx_http_sbx_residency_commands[] = {

    { ngx_string("sbx_geoip_db"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_TAKE1,
      ngx_http_sbx_geoip_db,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_country_group"),
      NGX_HTTP_MAIN_CONF|NGX_CONF_2MORE,
      ngx_http_sbx_country_group,
      NGX_HTTP_MAIN_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_residency"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_1MORE,
      ngx_http_sbx_residency,
      NGX_HTTP_LOC_CONF_OFFSET,
      0,
      NULL },

    { ngx_string("sbx_residency_unknown"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sbx_conf_set_enum,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sbx_residency_loc_conf_t, unknown),
      &ngx_http_sbx_residency_unknown },

    { ngx_string("sbx_residency_dry_run"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_FLAG,
      ngx_conf_set_flag_slot,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sbx_residency_loc_conf_t, dry_run),
      NULL },

    { ngx_string("sbx_residency_log_level"),
      NGX_HTTP_MAIN_CONF|NGX_HTTP_SRV_CONF|NGX_HTTP_LOC_CONF|NGX_CONF_TAKE1,
      ngx_http_sbx_conf_set_enum,
      NGX_HTTP_LOC_CONF_OFFSET,
      offsetof(ngx_http_sbx_residency_loc_conf_t, log_level),
      &ngx_http_sbx_residency_log_levels },

      ngx_null_command
};


static ngx_http_module_t  ngx_http_sbx_residency_module_ctx = {
    ngx_http_sbx_residency_add_variables,  /* preconfiguration */
    ngx_http_sbx_residency_init,           /* postconfiguration */

    ngx_http_sbx_residency_create_main_conf, /* create main configuration */
    ngx_http_sbx_residency_init_main_conf, /* init main configuration */

    NULL,                                  /* create server configuration */
    NULL,                                  /* merge server configuration */

    ngx_http_sbx_residency_create_loc_conf, /* create location configuration */
    ngx_http_sbx_residency_merge_loc_conf  /* merge location configuration */
};


ngx_module_t  ngx_http_sbx_residency_module = {
    NGX_MODULE_V1,
    &ngx_http_sbx_residency_module_ctx,    /* module context */
    ngx_http_sbx_residency_commands,       /* module directives */
    NGX_HTTP_MODULE,                       /* module type */
    NULL,                                  /* init master */
    NULL,                                  /* init module */
    NULL,                                  /* init process */
    NULL,                                  /* init thread */
    NULL,                                  /* exit thread */
    NULL,                                  /* exit process */
    NULL,                                  /* exit master */
    NGX_MODULE_V1_PADDING
};


static ngx_http_variable_t  ngx_http_sbx_residency_vars[] = {

    { ngx_string("sbx_country"), NULL,
      ngx_http_sbx_country_variable,
      offsetof(ngx_http_sbx_ctx_t, country), 0, 0 },

    { ngx_string("sbx_continent"), NULL,
      ngx_http_sbx_country_variable,
      offsetof(ngx_http_sbx_ctx_t, continent), 0, 0 },

    { ngx_string("sbx_residency"), NULL,
      ngx_http_sbx_residency_variable, 0, NGX_HTTP_VAR_NOCACHEABLE, 0 },

    { ngx_string("sbx_geoip_build_epoch"), NULL,
      ngx_http_sbx_geoip_epoch_variable, 0, 0, 0 },

      ngx_http_null_variable
};


static ngx_int_t
ngx_http_sbx_residency_handler(ngx_http_request_t *r)
{
    ngx_uint_t                           verdict, level;
    ngx_http_sbx_ctx_t                  *ctx;
    ngx_http_sbx_residency_ctx_t        *rctx;
    ngx_http_sbx_residency_rule_t       *rule;
    ngx_http_sbx_residency_rules_t      *rules;
    ngx_http_sbx_geo_subdivisions_t      sd;
    ngx_http_sbx_residency_loc_conf_t   *rlcf;
    ngx_http_sbx_residency_main_conf_t  *rmcf;

    rlcf = ngx_http_get_module_loc_conf(r, ngx_http_sbx_residency_module);

    rules = rlcf->rules;

    if (rules == NULL) {
        return NGX_DECLINED;
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_residency_module);

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }

    rctx = ngx_http_get_module_ctx(r, ngx_http_sbx_residency_module);

    if (rctx == NULL) {
        rctx = ngx_pcalloc(r->pool, sizeof(ngx_http_sbx_residency_ctx_t));
        if (rctx == NULL) {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }

        ngx_http_set_ctx(r, rctx, ngx_http_sbx_residency_module);
    }

    sd.n = 0;

    if (!ctx->geo_done || rules->subdivisions) {
        if (ngx_http_sbx_residency_locate(r, rmcf, ctx,
                                          rules->subdivisions ? &sd : NULL)
            != NGX_OK)
        {
            return NGX_HTTP_INTERNAL_SERVER_ERROR;
        }
    }

    rule = NULL;

    if (ctx->country.len == 0) {
        verdict = rlcf->unknown;

    } else {
        rule = ngx_http_sbx_residency_match(rules, &ctx->country, &sd);

        if (rule) {
            verdict = rule->allow;

        } else {
            verdict = rules->has_allow ? NGX_HTTP_SBX_RESIDENCY_DENY
                                       : NGX_HTTP_SBX_RESIDENCY_ALLOW;
        }
    }

    if (verdict == NGX_HTTP_SBX_RESIDENCY_ALLOW) {
        rctx->result = NGX_HTTP_SBX_RESULT_ALLOWED;
        return NGX_DECLINED;
    }

    level = rlcf->log_level;

    if (rule) {
        ngx_log_error(level, r->connection->log, 0,
                      "sbx_residency: %s country \"%V\" by rule \"%V\" "
                      "at %s:%ui",
                      rlcf->dry_run ? "dry run, would deny" : "denied",
                      &ctx->country, &rule->text, rule->conf_file,
                      rule->conf_line);

    } else if (ctx->country.len) {
        ngx_log_error(level, r->connection->log, 0,
                      "sbx_residency: %s country \"%V\": no rule matched "
                      "and allow rules exist",
                      rlcf->dry_run ? "dry run, would deny" : "denied",
                      &ctx->country);

    } else {
        ngx_log_error(level, r->connection->log, 0,
                      "sbx_residency: %s client with unknown country by "
                      "\"sbx_residency_unknown deny\"",
                      rlcf->dry_run ? "dry run, would deny" : "denied");
    }

    if (rlcf->dry_run) {
        rctx->result = NGX_HTTP_SBX_RESULT_DRY_RUN;
        ngx_http_sbx_metrics_dry_run(NGX_HTTP_SBX_DRY_RUN_RESIDENCY);
        return NGX_DECLINED;
    }

    rctx->result = NGX_HTTP_SBX_RESULT_DENIED;

    /* nginx knows no reason phrase for 451 (RFC 7725) */
    ngx_str_set(&r->headers_out.status_line,
                "451 Unavailable For Legal Reasons");

    ngx_http_finalize_request(r,
        ngx_http_sbx_send_error(r, 451, NGX_HTTP_SBX_RESIDENCY_DENIED, 0));

    return NGX_DONE;
}


static ngx_http_sbx_residency_rule_t *
ngx_http_sbx_residency_match(ngx_http_sbx_residency_rules_t *rules,
    ngx_str_t *country, ngx_http_sbx_geo_subdivisions_t *sd)
{
    ngx_uint_t                      i, j, k, bit;
    ngx_flag_t                      cc;
    ngx_http_sbx_subdivision_t     *sub;
    ngx_http_sbx_residency_rule_t  *rule;

    cc = country->len == 2
         && country->data[0] >= 'A' && country->data[0] <= 'Z'
         && country->data[1] >= 'A' && country->data[1] <= 'Z';

    bit = cc ? (country->data[0] - 'A') * 26 + (country->data[1] - 'A') : 0;

    rule = rules->rules.elts;

    for (i = 0; i < rules->rules.nelts; i++) {

        if (cc && (rule[i].countries[bit >> 3] & (1 << (bit & 7)))) {
            return &rule[i];
        }

        sub = rule[i].subdivisions.elts;

        for (j = 0; j < rule[i].subdivisions.nelts; j++) {

            if (country->len != 2
                || ngx_memcmp(sub[j].country, country->data, 2) != 0)
            {
                continue;
            }

            for (k = 0; k < sd->n; k++) {
                if (sd->code[k].len == sub[j].code.len
                    && ngx_memcmp(sd->code[k].data, sub[j].code.data,
                                  sub[j].code.len)
                       == 0)
                {
                    return &rule[i];
                }
            }
        }
    }

    return NULL;
}


/*
 * The core module calls this to give scripts req.client.country and
 * req.client.continent; the variables and the access handler use it too.
 */

ngx_int_t
ngx_http_sbx_geo_lookup(ngx_http_request_t *r, ngx_http_sbx_ctx_t *ctx)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf;

    if (ctx->geo_done) {
        return NGX_OK;
    }

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_residency_module);

    return ngx_http_sbx_residency_locate(r, rmcf, ctx, NULL);
}


static ngx_int_t
ngx_http_sbx_residency_locate(ngx_http_request_t *r,
    ngx_http_sbx_residency_main_conf_t *rmcf, ngx_http_sbx_ctx_t *ctx,
    ngx_http_sbx_geo_subdivisions_t *sd)
{
    int                     mmdb_error;
    u_char                  index[NGX_INT_T_LEN + 1];
    ngx_uint_t              i;
    struct sockaddr        *sa;
    MMDB_lookup_result_s    res;
    const char             *path[4];
#if (NGX_HAVE_INET6)
    u_char                 *p;
    struct sockaddr_in      sin;
    struct sockaddr_in6    *sin6;
#endif

    if (rmcf == NULL || !rmcf->opened) {
        ngx_str_null(&ctx->country);
        ngx_str_null(&ctx->continent);
        ctx->geo_done = 1;
        return NGX_OK;
    }

    sa = r->connection->sockaddr;

    switch (sa->sa_family) {

    case AF_INET:
        break;

#if (NGX_HAVE_INET6)
    case AF_INET6:
        sin6 = (struct sockaddr_in6 *) sa;

        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            /* a dual-stack listener: look the IPv4 address up */
            ngx_memzero(&sin, sizeof(struct sockaddr_in));
            sin.sin_family = AF_INET;
            p = (u_char *) &sin.sin_addr.s_addr;
            ngx_memcpy(p, &sin6->sin6_addr.s6_addr[12], 4);
            sa = (struct sockaddr *) &sin;
        }

        break;
#endif

    default:
        /* unix sockets have no country */
        goto unknown;
    }

    res = MMDB_lookup_sockaddr(&rmcf->mmdb, sa, &mmdb_error);

    if (mmdb_error != MMDB_SUCCESS) {

        if (mmdb_error != MMDB_IPV6_LOOKUP_IN_IPV4_DATABASE_ERROR) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "sbx_geoip_db \"%V\": MMDB_lookup_sockaddr() "
                          "failed: %s", &rmcf->db_path,
                          MMDB_strerror(mmdb_error));
        }

        goto unknown;
    }

    if (!res.found_entry) {
        goto unknown;
    }

    if (!ctx->geo_done) {
        if (ngx_http_sbx_residency_copy(r, &res.entry,
                                        ngx_http_sbx_path_country,
                                        &ctx->country)
            != NGX_OK
            || ngx_http_sbx_residency_copy(r, &res.entry,
                                           ngx_http_sbx_path_continent,
                                           &ctx->continent)
               != NGX_OK)
        {
            return NGX_ERROR;
        }

        ctx->geo_done = 1;
    }

    if (sd == NULL) {
        return NGX_OK;
    }

    /* region rules: subdivisions[i].iso_code, most general first */

    path[0] = "subdivisions";
    path[1] = (const char *) index;
    path[2] = "iso_code";
    path[3] = NULL;

    for (i = 0; i < NGX_HTTP_SBX_SUBDIVISIONS_MAX; i++) {
        *ngx_sprintf(index, "%ui", i) = '\0';

        if (ngx_http_sbx_residency_string(&res.entry, path, &sd->code[i])
            != NGX_OK)
        {
            break;
        }
    }

    sd->n = i;

    return NGX_OK;

unknown:

    if (!ctx->geo_done) {
        ngx_str_null(&ctx->country);
        ngx_str_null(&ctx->continent);
        ctx->geo_done = 1;
    }

    return NGX_OK;
}


/* a string of the mmap'd database; NGX_DECLINED when absent */

static ngx_int_t
ngx_http_sbx_residency_string(MMDB_entry_s *entry, const char *const *path,
    ngx_str_t *out)
{
    MMDB_entry_data_s  data;

    if (MMDB_aget_value(entry, &data, path) != MMDB_SUCCESS
        || !data.has_data
        || data.type != MMDB_DATA_TYPE_UTF8_STRING
        || data.data_size == 0)
    {
        return NGX_DECLINED;
    }

    out->data = (u_char *) data.utf8_string;
    out->len = data.data_size;

    return NGX_OK;
}


/* the same, copied into r->pool: "" when absent */

static ngx_int_t
ngx_http_sbx_residency_copy(ngx_http_request_t *r, MMDB_entry_s *entry,
    const char *const *path, ngx_str_t *out)
{
    ngx_str_t  s;

    if (ngx_http_sbx_residency_string(entry, path, &s) != NGX_OK) {
        ngx_str_null(out);
        return NGX_OK;
    }

    out->data = ngx_pnalloc(r->pool, s.len);
    if (out->data == NULL) {
        return NGX_ERROR;
    }

    ngx_memcpy(out->data, s.data, s.len);
    out->len = s.len;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_country_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t           *s;
    ngx_http_sbx_ctx_t  *ctx;

    ctx = ngx_http_sbx_get_ctx(r);
    if (ctx == NULL) {
        return NGX_ERROR;
    }

    if (ngx_http_sbx_geo_lookup(r, ctx) != NGX_OK) {
        return NGX_ERROR;
    }

    s = (ngx_str_t *) ((u_char *) ctx + data);

    if (s->len == 0) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->data = s->data;
    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_residency_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_str_t                     *s;
    ngx_http_sbx_residency_ctx_t  *rctx;

    rctx = ngx_http_get_module_ctx(r, ngx_http_sbx_residency_module);

    if (rctx == NULL || rctx->result == NGX_HTTP_SBX_RESULT_NONE) {
        v->not_found = 1;
        return NGX_OK;
    }

    s = &ngx_http_sbx_residency_results[rctx->result];

    v->data = s->data;
    v->len = s->len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_geoip_epoch_variable(ngx_http_request_t *r,
    ngx_http_variable_value_t *v, uintptr_t data)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf;

    rmcf = ngx_http_get_module_main_conf(r, ngx_http_sbx_residency_module);

    if (!rmcf->opened) {
        v->not_found = 1;
        return NGX_OK;
    }

    v->data = rmcf->build_epoch.data;
    v->len = rmcf->build_epoch.len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_residency_add_variables(ngx_conf_t *cf)
{
    ngx_http_variable_t  *var, *v;

    for (v = ngx_http_sbx_residency_vars; v->name.len; v++) {
        var = ngx_http_add_variable(cf, &v->name, v->flags);
        if (var == NULL) {
            return NGX_ERROR;
        }

        var->get_handler = v->get_handler;
        var->data = v->data;
    }

    return NGX_OK;
}


static void *
ngx_http_sbx_residency_create_main_conf(ngx_conf_t *cf)
{
    ngx_str_t                            name;
    ngx_http_sbx_residency_main_conf_t  *rmcf;

    rmcf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_residency_main_conf_t));
    if (rmcf == NULL) {
        return NULL;
    }

    /*
     * set by ngx_pcalloc():
     *
     *     rmcf->opened = 0;
     *     rmcf->db_path = { 0, NULL };
     *     rmcf->has_subdivisions = 0;
     */

    if (ngx_array_init(&rmcf->groups, cf->pool, 4,
                       sizeof(ngx_http_sbx_country_group_t))
        != NGX_OK)
    {
        return NULL;
    }

    ngx_str_set(&name, "eu");

    if (ngx_http_sbx_add_group(cf, rmcf, &name, ngx_http_sbx_group_eu,
                               sizeof(ngx_http_sbx_group_eu)
                               / sizeof(ngx_str_t), 1)
        != NGX_OK)
    {
        return NULL;
    }

    ngx_str_set(&name, "eea");

    if (ngx_http_sbx_add_group(cf, rmcf, &name, ngx_http_sbx_group_eea,
                               sizeof(ngx_http_sbx_group_eea)
                               / sizeof(ngx_str_t), 1)
        != NGX_OK)
    {
        return NULL;
    }

    return rmcf;
}


/* every group is known now: check the members of each */

static char *
ngx_http_sbx_residency_init_main_conf(ngx_conf_t *cf, void *conf)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf = conf;

    ngx_uint_t                      i, j;
    ngx_str_t                      *m;
    ngx_http_sbx_country_group_t   *g;
    ngx_http_sbx_residency_rule_t   probe;

    g = rmcf->groups.elts;

    for (i = 0; i < rmcf->groups.nelts; i++) {

        /* a throwaway rule to expand into: catches unknown codes, loops */

        ngx_memzero(&probe, sizeof(ngx_http_sbx_residency_rule_t));

        if (ngx_array_init(&probe.subdivisions, cf->temp_pool, 4,
                           sizeof(ngx_http_sbx_subdivision_t))
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        m = g[i].members.elts;

        for (j = 0; j < g[i].members.nelts; j++) {
            if (ngx_http_sbx_expand(cf, rmcf, &probe, &m[j], 1,
                                    g[i].conf_file, g[i].conf_line,
                                    "sbx_country_group")
                != NGX_OK)
            {
                return NGX_CONF_ERROR;
            }
        }
    }

    return NGX_CONF_OK;
}


static void *
ngx_http_sbx_residency_create_loc_conf(ngx_conf_t *cf)
{
    ngx_http_sbx_residency_loc_conf_t  *conf;

    conf = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_residency_loc_conf_t));
    if (conf == NULL) {
        return NULL;
    }

    conf->rules = NGX_CONF_UNSET_PTR;
    conf->unknown = NGX_CONF_UNSET_UINT;
    conf->dry_run = NGX_CONF_UNSET;
    conf->log_level = NGX_CONF_UNSET_UINT;

    return conf;
}


static char *
ngx_http_sbx_residency_merge_loc_conf(ngx_conf_t *cf, void *parent,
    void *child)
{
    ngx_http_sbx_residency_loc_conf_t *prev = parent;
    ngx_http_sbx_residency_loc_conf_t *conf = child;

    ngx_conf_merge_ptr_value(conf->rules, prev->rules, NULL);
    ngx_conf_merge_uint_value(conf->unknown, prev->unknown,
                              NGX_HTTP_SBX_RESIDENCY_DENY);
    ngx_conf_merge_value(conf->dry_run, prev->dry_run, 0);
    ngx_conf_merge_uint_value(conf->log_level, prev->log_level, NGX_LOG_ERR);

    if (conf->rules && !conf->rules->resolved) {
        if (ngx_http_sbx_resolve_rules(cf, conf->rules) != NGX_OK) {
            return NGX_CONF_ERROR;
        }
    }

    return NGX_CONF_OK;
}


/* names → country bitmap and subdivisions; the database must fit */

static ngx_int_t
ngx_http_sbx_resolve_rules(ngx_conf_t *cf,
    ngx_http_sbx_residency_rules_t *rules)
{
    ngx_uint_t                           i, j;
    ngx_str_t                           *name;
    ngx_http_sbx_residency_rule_t       *rule;
    ngx_http_sbx_residency_main_conf_t  *rmcf;

    rmcf = ngx_http_conf_get_module_main_conf(cf,
                                              ngx_http_sbx_residency_module);

    rules->resolved = 1;

    rule = rules->rules.elts;

    if (!rmcf->opened) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"sbx_residency\" needs a database: no "
                      "\"sbx_geoip_db\" in the http block, in %s:%ui",
                      rule[0].conf_file, rule[0].conf_line);
        return NGX_ERROR;
    }

    for (i = 0; i < rules->rules.nelts; i++) {

        name = rule[i].names.elts;

        for (j = 0; j < rule[i].names.nelts; j++) {
            if (ngx_http_sbx_expand(cf, rmcf, &rule[i], &name[j], 0,
                                    rule[i].conf_file, rule[i].conf_line,
                                    "sbx_residency")
                != NGX_OK)
            {
                return NGX_ERROR;
            }
        }

        if (rule[i].subdivisions.nelts == 0) {
            continue;
        }

        rules->subdivisions = 1;

        if (!rmcf->has_subdivisions) {
            ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                          "\"sbx_residency\" rule \"%V\" names a subdivision "
                          "but database \"%V\" (type \"%V\") has no "
                          "subdivisions: use a City database or country "
                          "codes only, in %s:%ui",
                          &rule[i].text, &rmcf->db_path, &rmcf->db_type,
                          rule[i].conf_file, rule[i].conf_line);
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_int_t
ngx_http_sbx_expand(ngx_conf_t *cf, ngx_http_sbx_residency_main_conf_t *rmcf,
    ngx_http_sbx_residency_rule_t *rule, ngx_str_t *name, ngx_uint_t depth,
    u_char *file, ngx_uint_t line, const char *directive)
{
    ngx_uint_t                     i, bit;
    ngx_str_t                     *m;
    ngx_http_sbx_subdivision_t    *sub;
    ngx_http_sbx_country_group_t  *g;

    if (ngx_http_sbx_is_country(name)) {
        bit = (name->data[0] - 'A') * 26 + (name->data[1] - 'A');
        rule->countries[bit >> 3] |= (u_char) (1 << (bit & 7));
        return NGX_OK;
    }

    if (ngx_http_sbx_is_subdivision(name)) {
        sub = ngx_array_push(&rule->subdivisions);
        if (sub == NULL) {
            return NGX_ERROR;
        }

        sub->country[0] = name->data[0];
        sub->country[1] = name->data[1];
        sub->code.data = name->data + 3;
        sub->code.len = name->len - 3;

        return NGX_OK;
    }

    g = ngx_http_sbx_looks_like_code(name) ? NULL
                                           : ngx_http_sbx_find_group(rmcf,
                                                                     name);

    if (g == NULL) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"%s\": unknown country code or group \"%V\": "
                      "expected an ISO 3166-1 alpha-2 code (\"DE\"), "
                      "a subdivision (\"DE-BY\") or a group of "
                      "\"sbx_country_group\", in %s:%ui",
                      directive, name, file, line);
        return NGX_ERROR;
    }

    if (depth >= NGX_HTTP_SBX_GROUP_DEPTH) {
        ngx_log_error(NGX_LOG_EMERG, cf->log, 0,
                      "\"%s\": country group \"%V\" nests too deep or "
                      "includes itself, in %s:%ui",
                      directive, name, file, line);
        return NGX_ERROR;
    }

    m = g->members.elts;

    for (i = 0; i < g->members.nelts; i++) {
        if (ngx_http_sbx_expand(cf, rmcf, rule, &m[i], depth + 1, file, line,
                                directive)
            != NGX_OK)
        {
            return NGX_ERROR;
        }
    }

    return NGX_OK;
}


static ngx_flag_t
ngx_http_sbx_is_country(ngx_str_t *s)
{
    const char  *p;

    if (s->len != 2) {
        return 0;
    }

    for (p = ngx_http_sbx_iso3166; *p; p += 2) {
        if (p[0] == s->data[0] && p[1] == s->data[1]) {
            return 1;
        }
    }

    return 0;
}


/* "CC-X", "CC-XX" or "CC-XXX": ISO 3166-2 */

static ngx_flag_t
ngx_http_sbx_is_subdivision(ngx_str_t *s)
{
    ngx_str_t   cc;
    ngx_uint_t  i;

    if (s->len < 4 || s->len > 6 || s->data[2] != '-') {
        return 0;
    }

    cc.data = s->data;
    cc.len = 2;

    if (!ngx_http_sbx_is_country(&cc)) {
        return 0;
    }

    for (i = 3; i < s->len; i++) {
        if (!((s->data[i] >= 'A' && s->data[i] <= 'Z')
              || (s->data[i] >= '0' && s->data[i] <= '9')))
        {
            return 0;
        }
    }

    return 1;
}


/* upper case letters, digits and '-' only: never a group name */

static ngx_flag_t
ngx_http_sbx_looks_like_code(ngx_str_t *s)
{
    ngx_uint_t  i;

    for (i = 0; i < s->len; i++) {
        if (!((s->data[i] >= 'A' && s->data[i] <= 'Z')
              || (s->data[i] >= '0' && s->data[i] <= '9')
              || s->data[i] == '-'))
        {
            return 0;
        }
    }

    return 1;
}


static ngx_http_sbx_country_group_t *
ngx_http_sbx_find_group(ngx_http_sbx_residency_main_conf_t *rmcf,
    ngx_str_t *name)
{
    ngx_uint_t                     i;
    ngx_http_sbx_country_group_t  *g;

    g = rmcf->groups.elts;

    for (i = 0; i < rmcf->groups.nelts; i++) {
        if (g[i].name.len == name->len
            && ngx_strncmp(g[i].name.data, name->data, name->len) == 0)
        {
            return &g[i];
        }
    }

    return NULL;
}


static ngx_int_t
ngx_http_sbx_add_group(ngx_conf_t *cf,
    ngx_http_sbx_residency_main_conf_t *rmcf, ngx_str_t *name,
    ngx_str_t *members, ngx_uint_t n, ngx_flag_t builtin)
{
    ngx_uint_t                     i;
    ngx_str_t                     *m;
    ngx_http_sbx_country_group_t  *g;

    g = ngx_http_sbx_find_group(rmcf, name);

    if (g == NULL) {
        g = ngx_array_push(&rmcf->groups);
        if (g == NULL) {
            return NGX_ERROR;
        }
    }

    g->name = *name;
    g->builtin = builtin;
    if (builtin) {
        g->conf_file = (u_char *) "(built in)";
        g->conf_line = 0;

    } else {
        g->conf_file = cf->conf_file->file.name.data;
        g->conf_line = cf->conf_file->line;
    }

    if (ngx_array_init(&g->members, cf->pool, n, sizeof(ngx_str_t))
        != NGX_OK)
    {
        return NGX_ERROR;
    }

    for (i = 0; i < n; i++) {
        m = ngx_array_push(&g->members);
        if (m == NULL) {
            return NGX_ERROR;
        }

        *m = members[i];
    }

    return NGX_OK;
}


static char *
ngx_http_sbx_geoip_db(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf = conf;

    int                  rc;
    u_char              *p, *type;
    ngx_err_t            err;
    ngx_str_t           *value, path;
    ngx_pool_cleanup_t  *cln;

    if (rmcf->db_path.data) {
        return "is duplicate";
    }

    value = cf->args->elts;
    path = value[1];

    if (ngx_conf_full_name(cf->cycle, &path, 1) != NGX_OK) {
        return NGX_CONF_ERROR;
    }

    rmcf->db_path = path;

    cln = ngx_pool_cleanup_add(cf->pool, 0);
    if (cln == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_set_errno(0);

    rc = MMDB_open((char *) path.data, MMDB_MODE_MMAP, &rmcf->mmdb);

    if (rc != MMDB_SUCCESS) {
        err = (rc == MMDB_FILE_OPEN_ERROR || rc == MMDB_IO_ERROR)
              ? ngx_errno : 0;

        ngx_conf_log_error(NGX_LOG_EMERG, cf, err,
                           "\"sbx_geoip_db\": MMDB_open(\"%V\") failed: %s",
                           &path, MMDB_strerror(rc));
        return NGX_CONF_ERROR;
    }

    rmcf->opened = 1;
    cln->handler = ngx_http_sbx_cleanup_mmdb;
    cln->data = rmcf;

    if (rmcf->mmdb.metadata.database_type) {
        rmcf->db_type.data = (u_char *) rmcf->mmdb.metadata.database_type;
        rmcf->db_type.len = ngx_strlen(rmcf->db_type.data);
    }

    /*
     * Subdivisions come with the City and Enterprise databases (and any
     * database whose type says "City"); Country databases have none.
     */

    type = rmcf->db_type.data ? rmcf->db_type.data : (u_char *) "";

    rmcf->has_subdivisions = ngx_strstrn(type, "City", 4 - 1) != NULL
                             || ngx_strstrn(type, "Enterprise", 10 - 1)
                                != NULL;

    if (ngx_http_sbx_mmdb_has_country(&rmcf->mmdb) != NGX_OK) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_geoip_db\": \"%V\" (type \"%V\") has no "
                           "country.iso_code in its records (expected a "
                           "Country or City database, or any mmdb with "
                           "country.iso_code)", &path, &rmcf->db_type);
        return NGX_CONF_ERROR;
    }

    p = ngx_pnalloc(cf->pool, NGX_INT64_LEN);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    rmcf->build_epoch.data = p;
    rmcf->build_epoch.len = ngx_sprintf(p, "%uL",
                                        rmcf->mmdb.metadata.build_epoch)
                            - p;

    ngx_log_error(NGX_LOG_INFO, cf->log, 0,
                  "sbx_geoip_db \"%V\": type \"%V\", build epoch %V, "
                  "IPv%ui, %s",
                  &path, &rmcf->db_type, &rmcf->build_epoch,
                  (ngx_uint_t) rmcf->mmdb.metadata.ip_version,
                  rmcf->has_subdivisions ? "with subdivisions"
                                         : "without subdivisions");

    return NGX_CONF_OK;
}


/*
 * A database the module can use has country.iso_code in its records: an
 * ASN or ISP database opens fine but would make every client "unknown".
 * Walks the search tree depth first, from the start of the address space,
 * and looks at the data of up to 256 networks (a City database may have
 * networks with a continent only); at most 2^20 nodes are read.
 */

static ngx_int_t
ngx_http_sbx_mmdb_has_country(MMDB_s *mmdb)
{
    int                  rc;
    uint32_t             stack[256], node, rec[2];
    uint8_t              type[2];
    ngx_uint_t           top, nodes, datas, i;
    MMDB_entry_s         entry[2];
    MMDB_entry_data_s    data;
    MMDB_search_node_s   sn;

    top = 0;
    nodes = 0;
    datas = 0;
    stack[top++] = 0;

    while (top && nodes++ < (1 << 20) && datas < 256) {
        node = stack[--top];

        if (MMDB_read_node(mmdb, node, &sn) != MMDB_SUCCESS) {
            return NGX_ERROR;
        }

        rec[0] = (uint32_t) sn.left_record;
        rec[1] = (uint32_t) sn.right_record;
        type[0] = sn.left_record_type;
        type[1] = sn.right_record_type;
        entry[0] = sn.left_record_entry;
        entry[1] = sn.right_record_entry;

        /* right first on the stack: the left (lower) half is read first */
        for (i = 2; i-- > 0; /* void */) {

            if (type[i] == MMDB_RECORD_TYPE_SEARCH_NODE) {
                if (top < sizeof(stack) / sizeof(stack[0])) {
                    stack[top++] = rec[i];
                }

                continue;
            }

            if (type[i] != MMDB_RECORD_TYPE_DATA) {
                continue;
            }

            datas++;

            rc = MMDB_get_value(&entry[i], &data, "country", "iso_code",
                                NULL);

            if (rc == MMDB_SUCCESS && data.has_data
                && data.type == MMDB_DATA_TYPE_UTF8_STRING)
            {
                return NGX_OK;
            }
        }
    }

    return NGX_ERROR;
}


static char *
ngx_http_sbx_country_group(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf = conf;

    ngx_str_t                     *value;
    ngx_http_sbx_country_group_t  *g;

    value = cf->args->elts;

    if (ngx_http_sbx_looks_like_code(&value[1])) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_country_group\": invalid group name "
                           "\"%V\": expected a name with a lower case "
                           "letter, such as \"dach\"", &value[1]);
        return NGX_CONF_ERROR;
    }

    g = ngx_http_sbx_find_group(rmcf, &value[1]);

    if (g && !g->builtin) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_country_group\": group \"%V\" is "
                           "duplicate, first defined in %s:%ui",
                           &value[1], g->conf_file, g->conf_line);
        return NGX_CONF_ERROR;
    }

    /* members are checked once every group is known: init_main_conf */

    if (ngx_http_sbx_add_group(cf, rmcf, &value[1], &value[2],
                               cf->args->nelts - 2, 0)
        != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    return NGX_CONF_OK;
}


static char *
ngx_http_sbx_residency(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    ngx_http_sbx_residency_loc_conf_t *rlcf = conf;

    u_char                          *p;
    size_t                           len;
    ngx_uint_t                       i, allow;
    ngx_str_t                       *value, *name;
    ngx_http_sbx_residency_rule_t   *rule;
    ngx_http_sbx_residency_rules_t  *rules;

    value = cf->args->elts;

    if (ngx_strcmp(value[1].data, "off") == 0) {

        if (cf->args->nelts != 2) {
            return "takes no country after \"off\"";
        }

        if (rlcf->rules != NGX_CONF_UNSET_PTR) {
            return "is duplicate: \"off\" cannot be mixed with rules";
        }

        rlcf->rules = NULL;
        return NGX_CONF_OK;
    }

    if (ngx_strcmp(value[1].data, "allow") == 0) {
        allow = NGX_HTTP_SBX_RESIDENCY_ALLOW;

    } else if (ngx_strcmp(value[1].data, "deny") == 0) {
        allow = NGX_HTTP_SBX_RESIDENCY_DENY;

    } else {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_residency\": invalid parameter \"%V\": "
                           "expected \"allow\", \"deny\" or \"off\"",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (cf->args->nelts < 3) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "\"sbx_residency %V\": expected at least one "
                           "country code, subdivision or group",
                           &value[1]);
        return NGX_CONF_ERROR;
    }

    if (rlcf->rules == NULL) {
        return "is duplicate: \"off\" cannot be mixed with rules";
    }

    if (rlcf->rules == NGX_CONF_UNSET_PTR) {
        rules = ngx_pcalloc(cf->pool, sizeof(ngx_http_sbx_residency_rules_t));
        if (rules == NULL) {
            return NGX_CONF_ERROR;
        }

        if (ngx_array_init(&rules->rules, cf->pool, 4,
                           sizeof(ngx_http_sbx_residency_rule_t))
            != NGX_OK)
        {
            return NGX_CONF_ERROR;
        }

        rlcf->rules = rules;
    }

    rules = rlcf->rules;

    rule = ngx_array_push(&rules->rules);
    if (rule == NULL) {
        return NGX_CONF_ERROR;
    }

    ngx_memzero(rule, sizeof(ngx_http_sbx_residency_rule_t));

    rule->allow = allow;
    rule->conf_file = cf->conf_file->file.name.data;
    rule->conf_line = cf->conf_file->line;

    if (allow == NGX_HTTP_SBX_RESIDENCY_ALLOW) {
        rules->has_allow = 1;
    }

    if (ngx_array_init(&rule->names, cf->pool, cf->args->nelts - 2,
                       sizeof(ngx_str_t))
        != NGX_OK
        || ngx_array_init(&rule->subdivisions, cf->pool, 1,
                          sizeof(ngx_http_sbx_subdivision_t))
           != NGX_OK)
    {
        return NGX_CONF_ERROR;
    }

    len = 0;

    for (i = 1; i < cf->args->nelts; i++) {
        len += value[i].len + 1;
    }

    p = ngx_pnalloc(cf->pool, len);
    if (p == NULL) {
        return NGX_CONF_ERROR;
    }

    rule->text.data = p;

    for (i = 1; i < cf->args->nelts; i++) {
        if (i > 1) {
            *p++ = ' ';
        }

        p = ngx_cpymem(p, value[i].data, value[i].len);

        if (i > 1) {
            name = ngx_array_push(&rule->names);
            if (name == NULL) {
                return NGX_CONF_ERROR;
            }

            *name = value[i];
        }
    }

    rule->text.len = p - rule->text.data;

    /* resolved in merge: groups and sbx_geoip_db may come later */

    return NGX_CONF_OK;
}


static void
ngx_http_sbx_cleanup_mmdb(void *data)
{
    ngx_http_sbx_residency_main_conf_t  *rmcf = data;

    if (rmcf->opened) {
        MMDB_close(&rmcf->mmdb);
        rmcf->opened = 0;
    }
}


static ngx_int_t
ngx_http_sbx_residency_init(ngx_conf_t *cf)
{
    ngx_http_handler_pt                *h;
    ngx_http_core_main_conf_t          *cmcf;
    ngx_http_sbx_residency_loc_conf_t  *rlcf;

    /* rules of the http block itself are only ever merged into others */

    rlcf = ngx_http_conf_get_module_loc_conf(cf, ngx_http_sbx_residency_module);

    if (rlcf->rules != NGX_CONF_UNSET_PTR && rlcf->rules != NULL
        && !rlcf->rules->resolved)
    {
        if (ngx_http_sbx_resolve_rules(cf, rlcf->rules) != NGX_OK) {
            return NGX_ERROR;
        }
    }

    cmcf = ngx_http_conf_get_module_main_conf(cf, ngx_http_core_module);

    /*
     * Handlers of a phase run last registered first: this module is
     * listed after ngx_http_sbx_ratelimit_module, so a denied request
     * never costs a rate limit check.
     */

    h = ngx_array_push(&cmcf->phases[NGX_HTTP_ACCESS_PHASE].handlers);
    if (h == NULL) {
        return NGX_ERROR;
    }

    *h = ngx_http_sbx_residency_handler;

    return NGX_OK;
}
