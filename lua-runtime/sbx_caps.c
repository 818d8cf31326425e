/*
 * sbx_caps.c: capability modules a connector may be given (DESIGN.md
 * section 5): json (a host-owned lua-cjson instance), base64, hex, sha256,
 * hmac (OpenSSL libcrypto) and log.  Every buffer is a Lua buffer, so the
 * call's memory limit covers it; bad arguments raise an error that names
 * the function.
 */

#include <string.h>
#include <stdio.h>

#include <lua.h>
#include <lauxlib.h>
#include <lua-cjson.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "sbx_lib.h"


#define SBX_JSON_MAX_DEPTH  64


static const struct {
    uint32_t     cap;
    const char  *name;
} sbx_cap_names[] = {
    { SBX_CAP_JSON, "json" },
    { SBX_CAP_BASE64, "base64" },
    { SBX_CAP_HEX, "hex" },
    { SBX_CAP_SHA256, "sha256" },
    { SBX_CAP_HMAC, "hmac" },
    { SBX_CAP_LOG, "log" },
    { 0, NULL }
};


const char *
sbx_cap_name(uint32_t cap)
{
    int  i;

    for (i = 0; sbx_cap_names[i].name; i++) {
        if (sbx_cap_names[i].cap == cap) {
            return sbx_cap_names[i].name;
        }
    }

    return NULL;
}


/* "json,base64" or "json base64" */

int
sbx_caps_parse(const char *list, uint32_t *caps, char *err, size_t errlen)
{
    int          i;
    size_t       len;
    const char  *p = list, *end;

    *caps = 0;

    while (*p) {
        while (*p == ',' || *p == ' ') {
            p++;
        }

        if (*p == '\0') {
            break;
        }

        end = p;
        while (*end && *end != ',' && *end != ' ') {
            end++;
        }

        len = end - p;

        for (i = 0; sbx_cap_names[i].name; i++) {
            if (strlen(sbx_cap_names[i].name) == len
                && strncmp(sbx_cap_names[i].name, p, len) == 0)
            {
                *caps |= sbx_cap_names[i].cap;
                break;
            }
        }

        if (sbx_cap_names[i].name == NULL) {
            snprintf(err, errlen, "unknown capability \"%.*s\" (known: json, "
                     "base64, hex, sha256, hmac, log)", (int) len, p);
            return -1;
        }

        p = end;
    }

    return 0;
}


static const char *
sbx_arg_string(lua_State *L, int i, const char *fname, size_t *len)
{
    if (lua_type(L, i) != LUA_TSTRING) {
        luaL_error(L, "%s: argument #%d must be a string, got %s", fname, i,
                   luaL_typename(L, i));
        return NULL;
    }

    return lua_tolstring(L, i, len);
}


/* base64 (RFC 4648 sections 4 and 5) */

static const char  sbx_b64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char  sbx_b64url[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";


static int
sbx_b64_encode(lua_State *L, const char *alphabet, int pad, const char *fn)
{
    size_t          len, i, n;
    char           *o;
    const uint8_t  *s;
    luaL_Buffer     b;

    s = (const uint8_t *) sbx_arg_string(L, 1, fn, &len);

    n = (len + 2) / 3 * 4;
    o = luaL_buffinitsize(L, &b, n ? n : 1);
    n = 0;

    for (i = 0; i + 2 < len; i += 3) {
        o[n++] = alphabet[s[i] >> 2];
        o[n++] = alphabet[((s[i] & 3) << 4) | (s[i + 1] >> 4)];
        o[n++] = alphabet[((s[i + 1] & 15) << 2) | (s[i + 2] >> 6)];
        o[n++] = alphabet[s[i + 2] & 63];
    }

    if (i < len) {
        o[n++] = alphabet[s[i] >> 2];

        if (i + 1 < len) {
            o[n++] = alphabet[((s[i] & 3) << 4) | (s[i + 1] >> 4)];
            o[n++] = alphabet[(s[i + 1] & 15) << 2];
        } else {
            o[n++] = alphabet[(s[i] & 3) << 4];
            if (pad) {
                o[n++] = '=';
            }
        }

        if (pad) {
            o[n++] = '=';
        }
    }

    luaL_pushresultsize(&b, n);

    return 1;
}


static int
sbx_b64_value(int c, int url)
{
    if (c >= 'A' && c <= 'Z') {
        return c - 'A';
    }
    if (c >= 'a' && c <= 'z') {
        return c - 'a' + 26;
    }
    if (c >= '0' && c <= '9') {
        return c - '0' + 52;
    }
    if (c == (url ? '-' : '+')) {
        return 62;
    }
    if (c == (url ? '_' : '/')) {
        return 63;
    }
    return -1;
}


static int
sbx_b64_decode(lua_State *L, int url, const char *fn)
{
    int             v;
    size_t          len, i, n, npad;
    char           *o;
    uint32_t        acc;
    unsigned        bits;
    const uint8_t  *s;
    luaL_Buffer     b;

    s = (const uint8_t *) sbx_arg_string(L, 1, fn, &len);

    npad = 0;
    while (len && s[len - 1] == '=' && npad < 2) {
        len--;
        npad++;
    }

    if ((!url && npad && (len + npad) % 4 != 0) || len % 4 == 1) {
        goto invalid;
    }

    if (!url && npad == 0 && len % 4 != 0) {
        goto invalid;
    }

    o = luaL_buffinitsize(L, &b, len / 4 * 3 + 3);
    n = 0;
    acc = 0;
    bits = 0;

    for (i = 0; i < len; i++) {
        v = sbx_b64_value(s[i], url);
        if (v < 0) {
            goto invalid;
        }

        acc = (acc << 6) | (uint32_t) v;
        bits += 6;

        if (bits >= 8) {
            bits -= 8;
            o[n++] = (char) ((acc >> bits) & 0xff);
        }
    }

    /* leftover bits must be zero (canonical encoding) */
    if (acc & ((1u << bits) - 1)) {
        goto invalid;
    }

    luaL_pushresultsize(&b, n);
    return 1;

invalid:

    return luaL_error(L, "%s: invalid base64 input", fn);
}


static int
sbx_base64_encode(lua_State *L)
{
    return sbx_b64_encode(L, sbx_b64, 1, "base64.encode");
}


static int
sbx_base64_decode(lua_State *L)
{
    return sbx_b64_decode(L, 0, "base64.decode");
}


static int
sbx_base64_encode_url(lua_State *L)
{
    return sbx_b64_encode(L, sbx_b64url, 0, "base64.encode_url");
}


static int
sbx_base64_decode_url(lua_State *L)
{
    return sbx_b64_decode(L, 1, "base64.decode_url");
}


/* hex */

static void
sbx_push_hex(lua_State *L, const uint8_t *s, size_t len)
{
    size_t       i;
    char        *o;
    luaL_Buffer  b;
    static const char  digits[] = "0123456789abcdef";

    o = luaL_buffinitsize(L, &b, len * 2 + 1);

    for (i = 0; i < len; i++) {
        o[2 * i] = digits[s[i] >> 4];
        o[2 * i + 1] = digits[s[i] & 15];
    }

    luaL_pushresultsize(&b, len * 2);
}


static int
sbx_hex_encode(lua_State *L)
{
    size_t       len;
    const char  *s;

    s = sbx_arg_string(L, 1, "hex.encode", &len);

    if (len > (size_t) -1 / 4) {
        return luaL_error(L, "hex.encode: input too large");
    }

    sbx_push_hex(L, (const uint8_t *) s, len);

    return 1;
}


static int
sbx_hex_digit(int c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }

    c |= 0x20;

    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }

    return -1;
}


static int
sbx_hex_decode(lua_State *L)
{
    int             h, l;
    size_t          len, i;
    char           *o;
    const uint8_t  *s;
    luaL_Buffer     b;

    s = (const uint8_t *) sbx_arg_string(L, 1, "hex.decode", &len);

    if (len % 2) {
        goto invalid;
    }

    o = luaL_buffinitsize(L, &b, len / 2 + 1);

    for (i = 0; i < len; i += 2) {
        h = sbx_hex_digit(s[i]);
        l = sbx_hex_digit(s[i + 1]);

        if (h < 0 || l < 0) {
            goto invalid;
        }

        o[i / 2] = (char) (h * 16 + l);
    }

    luaL_pushresultsize(&b, len / 2);
    return 1;

invalid:

    return luaL_error(L, "hex.decode: invalid hex input");
}


/* sha256, hmac */

static int
sbx_sha256(lua_State *L, const char *fn, int hex)
{
    size_t         len;
    unsigned int   mdlen;
    const char    *s;
    unsigned char  md[EVP_MAX_MD_SIZE];

    s = sbx_arg_string(L, 1, fn, &len);

    if (EVP_Digest(s, len, md, &mdlen, EVP_sha256(), NULL) != 1) {
        return luaL_error(L, "%s: digest failed", fn);
    }

    if (hex) {
        sbx_push_hex(L, md, mdlen);
    } else {
        lua_pushlstring(L, (const char *) md, mdlen);
    }

    return 1;
}


static int
sbx_sha256_digest(lua_State *L)
{
    return sbx_sha256(L, "sha256.digest", 0);
}


static int
sbx_sha256_hex(lua_State *L)
{
    return sbx_sha256(L, "sha256.hex", 1);
}


static int
sbx_hmac(lua_State *L, const char *fn, int hex)
{
    size_t         klen, mlen;
    unsigned int   mdlen;
    const char    *key, *msg;
    unsigned char  md[EVP_MAX_MD_SIZE];

    key = sbx_arg_string(L, 1, fn, &klen);
    msg = sbx_arg_string(L, 2, fn, &mlen);

    if (klen > 0x7fffffff
        || HMAC(EVP_sha256(), key, (int) klen, (const unsigned char *) msg,
                mlen, md, &mdlen) == NULL)
    {
        return luaL_error(L, "%s: hmac failed", fn);
    }

    if (hex) {
        sbx_push_hex(L, md, mdlen);
    } else {
        lua_pushlstring(L, (const char *) md, mdlen);
    }

    return 1;
}


static int
sbx_hmac_sha256(lua_State *L)
{
    return sbx_hmac(L, "hmac.sha256", 0);
}


static int
sbx_hmac_sha256_hex(lua_State *L)
{
    return sbx_hmac(L, "hmac.sha256_hex", 1);
}


/* log */

static int
sbx_log_info(lua_State *L)
{
    return sbx_log_args(L, SBX_LOG_INFO, "log.info");
}


static int
sbx_log_warn(lua_State *L)
{
    return sbx_log_args(L, SBX_LOG_WARN, "log.warn");
}


static int
sbx_log_err(lua_State *L)
{
    return sbx_log_args(L, SBX_LOG_ERR, "log.err");
}


static const luaL_Reg  sbx_base64_funcs[] = {
    { "encode", sbx_base64_encode },
    { "decode", sbx_base64_decode },
    { "encode_url", sbx_base64_encode_url },
    { "decode_url", sbx_base64_decode_url },
    { NULL, NULL }
};

static const luaL_Reg  sbx_hex_funcs[] = {
    { "encode", sbx_hex_encode },
    { "decode", sbx_hex_decode },
    { NULL, NULL }
};

static const luaL_Reg  sbx_sha256_funcs[] = {
    { "digest", sbx_sha256_digest },
    { "hex", sbx_sha256_hex },
    { NULL, NULL }
};

static const luaL_Reg  sbx_hmac_funcs[] = {
    { "sha256", sbx_hmac_sha256 },
    { "sha256_hex", sbx_hmac_sha256_hex },
    { NULL, NULL }
};

static const luaL_Reg  sbx_log_funcs[] = {
    { "info", sbx_log_info },
    { "warn", sbx_log_warn },
    { "err", sbx_log_err },
    { NULL, NULL }
};


/*
 * The one lua-cjson instance of the state: configured once by the host
 * (nesting depth, no NaN/Infinity), and only encode, decode and null are
 * handed out.
 */

static int
sbx_json_instance(lua_State *L)
{
    int  top = lua_gettop(L);

    if (lua_getfield(L, LUA_REGISTRYINDEX, "sbx.cjson") == LUA_TTABLE) {
        return 0;
    }

    lua_pop(L, 1);

    if (luaopen_cjson(L) != 1 || lua_getfield(L, -1, "new") != LUA_TFUNCTION)
    {
        lua_settop(L, top);
        return -1;
    }

    if (lua_pcall(L, 0, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TTABLE) {
        lua_settop(L, top);
        return -1;
    }

    lua_getfield(L, -1, "encode_max_depth");
    lua_pushinteger(L, SBX_JSON_MAX_DEPTH);
    lua_call(L, 1, 0);
    lua_getfield(L, -1, "decode_max_depth");
    lua_pushinteger(L, SBX_JSON_MAX_DEPTH);
    lua_call(L, 1, 0);
    lua_getfield(L, -1, "decode_invalid_numbers");
    lua_pushboolean(L, 0);
    lua_call(L, 1, 0);
    lua_getfield(L, -1, "encode_invalid_numbers");
    lua_pushboolean(L, 0);
    lua_call(L, 1, 0);

    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, "sbx.cjson");
    lua_replace(L, top + 1);
    lua_settop(L, top + 1);

    /* luaopen_cjson registers a global "cjson": scripts never see it */
    lua_pushnil(L);
    lua_setglobal(L, "cjson");

    return 0;
}


/*
 * json.encode and json.decode wrap the instance's functions.  lua-cjson's
 * buffers come from plain malloc, outside the Lua allocator's count, and
 * it exits the process when malloc fails (SANDBOX-NOTES): a 15 MB string
 * of control bytes makes a 90 MB encoding in a buffer that doubles as it
 * grows, enough to reach a pool's address-space limit and kill the helper
 * (502 sandbox_failure where a memory limit is 500).  So before encoding,
 * an upper bound of the result is computed from the value (escapes
 * counted per byte, 32 bytes per number or key that is not a string), and
 * unless four times that bound fits in what the call may still allocate
 * (the buffer, its doubling, the realloc copy and the Lua string of the
 * result), the call trips the memory limit.  The walk stops as soon as
 * the bound is passed, so a table that refers to itself many times costs
 * no more than the limit allows.  Decoding needs one scratch buffer of
 * the text's length: it must fit as well.  Errors name the function.
 */

#define SBX_JSON_SCALAR  32


static size_t
sbx_json_string_size(const unsigned char *p, size_t len)
{
    size_t  n = 2;

    while (len--) {
        if (*p < 0x20 || *p == 0x7f) {
            n += 6;                             /* \u001f */

        } else if (*p == '"' || *p == '\\' || *p == '/') {
            n += 2;

        } else {
            n++;
        }

        p++;
    }

    return n;
}


static int
sbx_json_size(lua_State *L, int idx, int depth, size_t *size, size_t max)
{
    size_t       len;
    const char  *s;

    switch (lua_type(L, idx)) {

    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &len);
        *size += sbx_json_string_size((const unsigned char *) s, len);
        break;

    case LUA_TTABLE:
        /* deeper tables are refused by lua-cjson itself */
        if (depth > SBX_JSON_MAX_DEPTH) {
            break;
        }

        luaL_checkstack(L, 3, "json.encode");
        *size += 2 + SBX_JSON_SCALAR;

        lua_pushnil(L);

        while (lua_next(L, idx) != 0) {
            /* never lua_tolstring() a number key: it would break next */
            if (lua_type(L, -2) == LUA_TSTRING) {
                s = lua_tolstring(L, -2, &len);
                *size += sbx_json_string_size((const unsigned char *) s, len);

            } else {
                *size += SBX_JSON_SCALAR;
            }

            *size += 2;                         /* ':' and ',' */

            if (*size > max
                || sbx_json_size(L, lua_gettop(L), depth + 1, size, max)
                   != 0)
            {
                lua_pop(L, 2);
                return -1;
            }

            lua_pop(L, 1);
        }

        break;

    default:
        *size += SBX_JSON_SCALAR;
    }

    return *size > max ? -1 : 0;
}


static int
sbx_json_call(lua_State *L, const char *fname)
{
    const char  *msg;

    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);

    if (lua_pcall(L, lua_gettop(L) - 1, 1, 0) == LUA_OK) {
        return 1;
    }

    /* a tripped limit raises its own error */
    sbx_check_tripped(L);

    msg = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : "failed";

    return luaL_error(L, "%s: %s", fname, msg);
}


static int
sbx_json_encode(lua_State *L)
{
    size_t  size = 0;

    if (lua_gettop(L) != 1) {
        return luaL_error(L, "json.encode: expected 1 argument");
    }

    if (sbx_json_size(L, 1, 1, &size, sbx_memory_left(L) / 4) != 0) {
        sbx_trip_memory(L);
    }

    return sbx_json_call(L, "json.encode");
}


static int
sbx_json_decode(lua_State *L)
{
    size_t  len;

    if (lua_gettop(L) != 1 || lua_type(L, 1) != LUA_TSTRING) {
        return luaL_error(L, "json.decode: expected a string");
    }

    (void) lua_tolstring(L, 1, &len);

    if (len > sbx_memory_left(L)) {
        sbx_trip_memory(L);
    }

    return sbx_json_call(L, "json.decode");
}


/*
 * libcrypto sets itself up on first use: pthread_once (a futex wake), the
 * provider tables, and an atexit handler.  None of that may happen under
 * the seccomp filter, so the engine calls this before the sandbox; no
 * configuration file is read, and nothing runs at exit.
 */

int
sbx_caps_init(void)
{
    unsigned int   mdlen;
    unsigned char  md[EVP_MAX_MD_SIZE];

    if (OPENSSL_init_crypto(OPENSSL_INIT_NO_LOAD_CONFIG
                            | OPENSSL_INIT_NO_ATEXIT, NULL) != 1)
    {
        return -1;
    }

    if (EVP_Digest("", 0, md, &mdlen, EVP_sha256(), NULL) != 1
        || HMAC(EVP_sha256(), "k", 1, (const unsigned char *) "", 0, md,
                &mdlen) == NULL)
    {
        return -1;
    }

    return 0;
}


int
sbx_caps_open(lua_State *L, uint32_t cap)
{
    switch (cap) {

    case SBX_CAP_JSON:
        if (sbx_json_instance(L) != 0) {
            return -1;
        }

        lua_createtable(L, 0, 3);
        lua_getfield(L, -2, "encode");
        lua_pushcclosure(L, sbx_json_encode, 1);
        lua_setfield(L, -2, "encode");
        lua_getfield(L, -2, "decode");
        lua_pushcclosure(L, sbx_json_decode, 1);
        lua_setfield(L, -2, "decode");
        lua_getfield(L, -2, "null");
        lua_setfield(L, -2, "null");
        lua_remove(L, -2);
        return 0;

    case SBX_CAP_BASE64:
        luaL_newlib(L, sbx_base64_funcs);
        return 0;

    case SBX_CAP_HEX:
        luaL_newlib(L, sbx_hex_funcs);
        return 0;

    case SBX_CAP_SHA256:
        /* libcrypto was set up by sbx_caps_init(), before the sandbox */
        luaL_newlib(L, sbx_sha256_funcs);
        return 0;

    case SBX_CAP_HMAC:
        luaL_newlib(L, sbx_hmac_funcs);
        return 0;

    case SBX_CAP_LOG:
        luaL_newlib(L, sbx_log_funcs);
        return 0;
    }

    return -1;
}
