/*
 * sbx_run.c: sbx-lua-helper run, the local runner for connector authors.
 *
 *   sbx-lua-helper run SCRIPT --request REQ.json [--response RES.json]
 *       [--capabilities LIST] [--limits memory=SIZE,instructions=N,
 *       timeout=TIME] [--chunkname NAME]
 *
 * The files are read and the JSON request is turned into a CALL payload
 * before the sandbox; then the engine runs the script under the same
 * sandbox, limits and checks as a gateway helper (seccomp profile
 * SBX_PROFILE_CLI: writes to fds 1 and 2 only).  JSON is decoded and
 * encoded by lua-cjson in a host-side lua_State of its own, never in the
 * engine's state.
 *
 * stdout: one JSON object, the result of the last hook that ran:
 *   a request to go upstream   {"uri","args","headers","body"}
 *   a response                 {"status","headers","body"}
 * "body" is null when there is none; a body that is not valid UTF-8 is
 * given as "body_base64" instead.  Repeated header fields are arrays.
 *
 * stderr: the script's log lines ("[info] ..."), then per hook a usage
 * line "HOOK hook: instructions=N memory_peak=BYTES time_us=N", and on
 * failure the message the gateway's error log shows.
 *
 * Exit status: 0 success, 1 script error or limit hit (also a script that
 * does not load), 2 usage error (bad options, unreadable or invalid
 * request/response file).
 */

#define _GNU_SOURCE

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/time.h>

#include <lua.h>
#include <lauxlib.h>
#include <lua-cjson.h>

#include <openssl/evp.h>

#include "sbx_cli.h"
#include "sbx_sandbox.h"


#define SBX_RUN_MAX_INPUT       (64 * 1024 * 1024)
#define SBX_RUN_MAX_HEADERS     1000
#define SBX_RUN_AS_MIN          (1ULL << 32)


typedef struct {
    unsigned            outcome;
    uint64_t            instructions;
    uint64_t            memory_peak;
    uint32_t            time_us;
    uint32_t            status;
    sbx_str_t           uri;
    sbx_str_t           args;
    sbx_str_t           message;
    sbx_rd_t            headers;        /* positioned at the first header */
    uint32_t            nheaders;
    uint8_t             has_body;
    sbx_str_t           body;
} sbx_run_result_t;


static const char *volatile  sbx_run_phase = "top level";


/* ---- output: write(2) only, stdio is not used once sandboxed ---- */

static void
sbx_run_write(int fd, const char *p, size_t len)
{
    ssize_t  n;

    while (len) {
        n = write(fd, p, len);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }

            return;
        }

        p += n;
        len -= (size_t) n;
    }
}


static void
sbx_run_printf(int fd, const char *fmt, ...)
{
    int      n;
    char     buf[4096];
    va_list  args;

    va_start(args, fmt);
    n = vsnprintf(buf, sizeof(buf), fmt, args);
    va_end(args);

    if (n < 0) {
        return;
    }

    if ((size_t) n >= sizeof(buf)) {
        n = sizeof(buf) - 1;
    }

    sbx_run_write(fd, buf, (size_t) n);
}


/* script-made text on stderr: CR, LF and other control bytes escaped */

static void
sbx_run_print_line(const char *prefix, const uint8_t *p, size_t len)
{
    char    buf[4 * SBX_MAX_LOG_BYTES + 256];
    size_t  i, n;

    n = (size_t) snprintf(buf, 256, "%s", prefix);

    for (i = 0; i < len && n < sizeof(buf) - 8; i++) {
        if (p[i] == '\n') {
            buf[n++] = '\\';
            buf[n++] = 'n';

        } else if (p[i] == '\r') {
            buf[n++] = '\\';
            buf[n++] = 'r';

        } else if ((p[i] < 0x20 && p[i] != '\t') || p[i] == 0x7f) {
            n += (size_t) snprintf(buf + n, 5, "\\x%02x", p[i]);

        } else {
            buf[n++] = (char) p[i];
        }
    }

    buf[n++] = '\n';

    sbx_run_write(2, buf, n);
}


static void
sbx_run_usage(void)
{
    sbx_run_printf(2,
        "usage: sbx-lua-helper run SCRIPT --request REQ.json "
        "[--response RES.json]\n"
        "           [--capabilities NAME[,NAME...]] "
        "[--limits memory=SIZE,instructions=N,timeout=TIME]\n"
        "           [--chunkname NAME]\n");
}


/* the wall-clock backstop for long C calls that no hook interrupts */

static void
sbx_run_alarm(int signo)
{
    const char  *phase = (const char *) sbx_run_phase;
    const char  *msg;

    msg = signo == SIGXCPU
          ? ": time limit exceeded (stopped by the runner's CPU-time "
            "limit)\n"
          : ": time limit exceeded (stopped by the wall-clock backstop)\n";

    sbx_run_write(2, phase, strlen(phase));
    sbx_run_write(2, msg, strlen(msg));
    _exit(1);
}


/* ---- reading the JSON files (host state, lua-cjson) ---- */

static int
sbx_run_is_null(lua_State *L, int idx)
{
    return lua_isnoneornil(L, idx)
           || (lua_type(L, idx) == LUA_TLIGHTUSERDATA
               && lua_touserdata(L, idx) == NULL);
}


/* decodes the file's text; leaves the object on the stack */

static int
sbx_run_decode(lua_State *L, const char *path, const char *data, size_t len,
    char *err, size_t errlen)
{
    lua_getglobal(L, "sbx_run_cjson");
    lua_getfield(L, -1, "decode");
    lua_remove(L, -2);
    lua_pushlstring(L, data, len);

    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        snprintf(err, errlen, "%s: invalid JSON: %s", path,
                 lua_tostring(L, -1));
        lua_pop(L, 1);
        return -1;
    }

    if (lua_type(L, -1) != LUA_TTABLE) {
        snprintf(err, errlen, "%s: expected a JSON object", path);
        lua_pop(L, 1);
        return -1;
    }

    return 0;
}


static int
sbx_run_check_keys(lua_State *L, int t, const char *const *allowed,
    const char *what, char *err, size_t errlen)
{
    int                 ok;
    const char         *k;
    const char *const  *a;

    lua_pushnil(L);

    while (lua_next(L, t)) {
        lua_pop(L, 1);

        if (lua_type(L, -1) != LUA_TSTRING) {
            snprintf(err, errlen, "%s: expected an object", what);
            lua_pop(L, 1);
            return -1;
        }

        k = lua_tostring(L, -1);
        ok = 0;

        for (a = allowed; *a; a++) {
            if (strcmp(*a, k) == 0) {
                ok = 1;
                break;
            }
        }

        if (!ok) {
            snprintf(err, errlen, "%s: unknown field \"%s\"", what, k);
            lua_pop(L, 1);
            return -1;
        }
    }

    return 0;
}


/* copies string field `key` of table t into table n, or a default */

static int
sbx_run_copy_str(lua_State *L, int t, int n, const char *key,
    const char *def, const char *what, char *err, size_t errlen)
{
    lua_getfield(L, t, key);

    if (sbx_run_is_null(L, -1)) {
        lua_pop(L, 1);

        if (def == NULL) {
            return 0;
        }

        lua_pushstring(L, def);

    } else if (lua_type(L, -1) != LUA_TSTRING) {
        snprintf(err, errlen, "%s: \"%s\" must be a string", what, key);
        lua_pop(L, 1);
        return -1;
    }

    lua_setfield(L, n, key);

    return 0;
}


static int
sbx_run_push_header_value(lua_State *L, int idx, const char *name,
    const char *what, char *err, size_t errlen)
{
    size_t       len;
    const char  *s;

    if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER) {
        snprintf(err, errlen, "%s: header \"%s\": a value must be a string "
                 "or an array of strings", what, name);
        return -1;
    }

    lua_pushvalue(L, idx);
    s = lua_tolstring(L, -1, &len);

    if (!sbx_header_value_valid((const uint8_t *) s, len)) {
        snprintf(err, errlen, "%s: header \"%s\": invalid value (control "
                 "characters, or longer than %d bytes)", what, name,
                 SBX_MAX_HEADER_VALUE);
        lua_pop(L, 1);
        return -1;
    }

    return 0;
}


/*
 * Turns the "headers" object of table t into a flat array {name, value,
 * name, value, ...} with lower-case names, in table n.
 */

static int
sbx_run_copy_headers(lua_State *L, int t, int n, const char *what, char *err,
    size_t errlen)
{
    int          h, list;
    char         lname[SBX_MAX_HEADER_NAME];
    size_t       len, i;
    lua_Integer  k, cnt, total = 0;
    const char  *name;

    lua_createtable(L, 16, 0);
    list = lua_gettop(L);

    lua_getfield(L, t, "headers");
    h = lua_gettop(L);

    if (!sbx_run_is_null(L, h)) {
        if (lua_type(L, h) != LUA_TTABLE) {
            snprintf(err, errlen, "%s: \"headers\" must be an object", what);
            return -1;
        }

        lua_pushnil(L);

        while (lua_next(L, h)) {
            if (lua_type(L, -2) != LUA_TSTRING) {
                snprintf(err, errlen, "%s: \"headers\" must be an object",
                         what);
                return -1;
            }

            name = lua_tolstring(L, -2, &len);

            if (!sbx_header_name_valid((const uint8_t *) name, len)) {
                snprintf(err, errlen, "%s: invalid header name \"%s\"", what,
                         name);
                return -1;
            }

            for (i = 0; i < len; i++) {
                lname[i] = (name[i] >= 'A' && name[i] <= 'Z')
                           ? (char) (name[i] | 0x20) : name[i];
            }

            if (lua_type(L, -1) == LUA_TTABLE) {
                cnt = (lua_Integer) lua_rawlen(L, -1);

                for (k = 1; k <= cnt; k++) {
                    lua_rawgeti(L, -1, k);

                    if (sbx_run_push_header_value(L, lua_gettop(L), name,
                                                  what, err, errlen) != 0)
                    {
                        return -1;
                    }

                    lua_pushlstring(L, lname, len);
                    lua_rawseti(L, list, ++total);
                    lua_rawseti(L, list, ++total);
                    lua_pop(L, 1);
                }

            } else {
                if (sbx_run_push_header_value(L, lua_gettop(L), name, what,
                                              err, errlen) != 0)
                {
                    return -1;
                }

                lua_pushlstring(L, lname, len);
                lua_rawseti(L, list, ++total);
                lua_rawseti(L, list, ++total);
            }

            lua_pop(L, 1);

            if (total / 2 > SBX_RUN_MAX_HEADERS) {
                snprintf(err, errlen, "%s: more than %d header fields", what,
                         SBX_RUN_MAX_HEADERS);
                return -1;
            }
        }
    }

    lua_pop(L, 1);
    lua_setfield(L, n, "headers");

    return 0;
}


/* "body" (text) or "body_base64" (any bytes) into n.body */

static int
sbx_run_copy_body(lua_State *L, int t, int n, const char *what, char *err,
    size_t errlen)
{
    int                 rc;
    size_t              len, pad;
    luaL_Buffer         b;
    unsigned char      *o;
    const char         *s;

    lua_getfield(L, t, "body_base64");

    if (sbx_run_is_null(L, -1)) {
        lua_pop(L, 1);
        return sbx_run_copy_str(L, t, n, "body", NULL, what, err, errlen);
    }

    lua_getfield(L, t, "body");

    if (!sbx_run_is_null(L, -1)) {
        snprintf(err, errlen, "%s: give \"body\" or \"body_base64\", not "
                 "both", what);
        return -1;
    }

    lua_pop(L, 1);

    if (lua_type(L, -1) != LUA_TSTRING) {
        snprintf(err, errlen, "%s: \"body_base64\" must be a string", what);
        return -1;
    }

    s = lua_tolstring(L, -1, &len);

    if (len % 4 != 0) {
        goto invalid;
    }

    pad = (len && s[len - 1] == '=') + (len > 1 && s[len - 2] == '=');

    o = (unsigned char *) luaL_buffinitsize(L, &b, len / 4 * 3 + 1);
    rc = len ? EVP_DecodeBlock(o, (const unsigned char *) s, (int) len) : 0;

    if (rc < 0 || (size_t) rc < pad) {
        goto invalid;
    }

    luaL_pushresultsize(&b, (size_t) rc - pad);
    lua_setfield(L, n, "body");
    lua_pop(L, 1);

    return 0;

invalid:

    snprintf(err, errlen, "%s: \"body_base64\" is not valid base64", what);
    return -1;
}


static const char *const  sbx_run_req_fields[] = {
    "method", "uri", "args", "headers", "body", "body_base64", "client",
    "id", "connector", NULL
};

static const char *const  sbx_run_client_fields[] = {
    "ip", "country", "continent", NULL
};

static const char *const  sbx_run_res_fields[] = {
    "status", "headers", "body", "body_base64", NULL
};


/* validates the decoded request at t; pushes its normalized form */

static int
sbx_run_norm_request(lua_State *L, int t, const char *what, char *err,
    size_t errlen)
{
    int          n, c, top;
    size_t       len;
    const char  *uri, *q;

    top = lua_gettop(L);

    if (sbx_run_check_keys(L, t, sbx_run_req_fields, what, err, errlen)
        != 0)
    {
        return -1;
    }

    lua_createtable(L, 0, 12);
    n = lua_gettop(L);

    if (sbx_run_copy_str(L, t, n, "method", "GET", what, err, errlen)
        || sbx_run_copy_str(L, t, n, "uri", "/", what, err, errlen)
        || sbx_run_copy_str(L, t, n, "args", NULL, what, err, errlen)
        || sbx_run_copy_str(L, t, n, "id", "run-0001", what, err, errlen)
        || sbx_run_copy_str(L, t, n, "connector", NULL, what, err, errlen)
        || sbx_run_copy_headers(L, t, n, what, err, errlen)
        || sbx_run_copy_body(L, t, n, what, err, errlen))
    {
        lua_settop(L, top);
        return -1;
    }

    /* "uri": "/path?a=1" without "args" is split like nginx does */
    lua_getfield(L, n, "uri");
    uri = lua_tolstring(L, -1, &len);

    if (len == 0 || uri[0] != '/') {
        snprintf(err, errlen, "%s: \"uri\" must start with \"/\"", what);
        lua_settop(L, top);
        return -1;
    }

    q = memchr(uri, '?', len);

    if (q) {
        if (lua_getfield(L, n, "args") != LUA_TNIL) {
            snprintf(err, errlen, "%s: give the query in \"uri\" or in "
                     "\"args\", not both", what);
            lua_settop(L, top);
            return -1;
        }

        lua_pop(L, 1);
        lua_pushlstring(L, q + 1, len - (size_t) (q - uri) - 1);
        lua_setfield(L, n, "args");
        lua_pushlstring(L, uri, (size_t) (q - uri));
        lua_setfield(L, n, "uri");
    }

    lua_pop(L, 1);

    if (lua_getfield(L, n, "args") == LUA_TNIL) {
        lua_pushliteral(L, "");
        lua_setfield(L, n, "args");
    }

    lua_pop(L, 1);

    /* client: {ip, country, continent} */
    lua_getfield(L, t, "client");
    c = lua_gettop(L);

    if (sbx_run_is_null(L, c)) {
        lua_pushliteral(L, "127.0.0.1");
        lua_setfield(L, n, "ip");
        lua_pushliteral(L, "");
        lua_setfield(L, n, "country");
        lua_pushliteral(L, "");
        lua_setfield(L, n, "continent");

    } else if (lua_type(L, c) != LUA_TTABLE
               || sbx_run_check_keys(L, c, sbx_run_client_fields,
                                     "\"client\"", err, errlen) != 0
               || sbx_run_copy_str(L, c, n, "ip", "127.0.0.1", what, err,
                                   errlen)
               || sbx_run_copy_str(L, c, n, "country", "", what, err, errlen)
               || sbx_run_copy_str(L, c, n, "continent", "", what, err,
                                   errlen))
    {
        if (lua_type(L, c) != LUA_TTABLE) {
            snprintf(err, errlen, "%s: \"client\" must be an object", what);
        }

        lua_settop(L, top);
        return -1;
    }

    lua_settop(L, n);

    return 0;
}


static int
sbx_run_norm_response(lua_State *L, int t, const char *what, char *err,
    size_t errlen)
{
    int          n, top;
    lua_Number   d;

    top = lua_gettop(L);

    if (sbx_run_check_keys(L, t, sbx_run_res_fields, what, err, errlen)
        != 0)
    {
        return -1;
    }

    lua_createtable(L, 0, 4);
    n = lua_gettop(L);

    lua_getfield(L, t, "status");

    if (sbx_run_is_null(L, -1)) {
        lua_pushinteger(L, 200);

    } else {
        d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;

        if (!(d >= 100 && d <= 599) || (lua_Number) (lua_Integer) d != d) {
            snprintf(err, errlen, "%s: \"status\" must be an integer from "
                     "100 to 599", what);
            lua_settop(L, top);
            return -1;
        }

        lua_pushinteger(L, (lua_Integer) d);
    }

    lua_setfield(L, n, "status");
    lua_pop(L, 1);

    if (sbx_run_copy_headers(L, t, n, what, err, errlen)
        || sbx_run_copy_body(L, t, n, what, err, errlen))
    {
        lua_settop(L, top);
        return -1;
    }

    lua_settop(L, n);

    return 0;
}


/* ---- CALL payload ---- */

static void
sbx_run_put_field(lua_State *L, sbx_wr_t *w, int t, const char *key)
{
    size_t       len = 0;
    const char  *s;

    lua_getfield(L, t, key);
    s = lua_tolstring(L, -1, &len);
    sbx_put_str(w, s, s ? len : 0);
    lua_pop(L, 1);
}


static void
sbx_run_put_headers_body(lua_State *L, sbx_wr_t *w, int t)
{
    size_t       len;
    lua_Integer  i, n;
    const char  *s;

    lua_getfield(L, t, "headers");
    n = (lua_Integer) lua_rawlen(L, -1);
    sbx_put_u32(w, (uint32_t) (n / 2));

    for (i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        s = lua_tolstring(L, -1, &len);
        sbx_put_str(w, s, len);
        lua_pop(L, 1);
    }

    lua_pop(L, 1);

    if (lua_getfield(L, t, "body") == LUA_TSTRING) {
        s = lua_tolstring(L, -1, &len);
        sbx_put_u8(w, 1);
        sbx_put_str(w, s, len);

    } else {
        sbx_put_u8(w, 0);
        sbx_put_str(w, NULL, 0);
    }

    lua_pop(L, 1);
}


static void
sbx_run_put_call(lua_State *L, sbx_wr_t *w, int req, int res)
{
    sbx_run_put_field(L, w, req, "method");
    sbx_run_put_field(L, w, req, "uri");
    sbx_run_put_field(L, w, req, "args");
    sbx_run_put_field(L, w, req, "id");
    sbx_run_put_field(L, w, req, "ip");
    sbx_run_put_field(L, w, req, "country");
    sbx_run_put_field(L, w, req, "continent");
    sbx_run_put_headers_body(L, w, req);

    if (res) {
        lua_getfield(L, res, "status");
        sbx_put_u32(w, (uint32_t) lua_tointeger(L, -1));
        lua_pop(L, 1);
        sbx_run_put_headers_body(L, w, res);
    }
}


/* builds the CALL payload in a new buffer (caller frees) */

static uint8_t *
sbx_run_build_call(lua_State *L, int req, int res, size_t *len)
{
    uint8_t   *buf;
    sbx_wr_t   w;

    sbx_wr_init(&w, NULL, 0);
    sbx_run_put_call(L, &w, req, res);

    buf = malloc(w.need ? w.need : 1);
    if (buf == NULL) {
        return NULL;
    }

    *len = w.need;
    sbx_wr_init(&w, buf, *len);
    sbx_run_put_call(L, &w, req, res);

    if (w.overflow) {
        free(buf);
        return NULL;
    }

    return buf;
}


/* ---- RESULT payload ---- */

static int
sbx_run_skip_headers(sbx_rd_t *rd, uint32_t n)
{
    uint32_t   i;
    sbx_str_t  s;

    for (i = 0; i < n; i++) {
        if (sbx_get_str(rd, &s) || sbx_get_str(rd, &s)) {
            return -1;
        }
    }

    return 0;
}


static int
sbx_run_read_result(const uint8_t *p, size_t len, sbx_run_result_t *r)
{
    uint8_t    outcome, level;
    uint32_t   cpu, nlogs, i;
    sbx_rd_t   rd;
    sbx_str_t  line;
    static const char  *prefix[] = { "[info] ", "[info] ", "[warn] ",
                                     "[error] " };

    memset(r, 0, sizeof(*r));
    sbx_rd_init(&rd, p, len);

    if (sbx_get_u8(&rd, &outcome) || sbx_get_u64(&rd, &r->instructions)
        || sbx_get_u64(&rd, &r->memory_peak) || sbx_get_u32(&rd, &r->time_us)
        || sbx_get_u32(&rd, &cpu)
        || sbx_get_count(&rd, &nlogs, SBX_MAX_LOG_LINES + 1, 5))
    {
        return -1;
    }

    r->outcome = outcome;

    for (i = 0; i < nlogs; i++) {
        if (sbx_get_u8(&rd, &level) || sbx_get_str(&rd, &line)) {
            return -1;
        }

        sbx_run_print_line(prefix[level <= SBX_LOG_ERR ? level : 0],
                           line.data, line.len);
    }

    switch (outcome) {

    case SBX_OUT_RESPONSE:
        if (sbx_get_u32(&rd, &r->status)) {
            return -1;
        }

        break;

    case SBX_OUT_REQUEST:
        if (sbx_get_str(&rd, &r->uri) || sbx_get_str(&rd, &r->args)) {
            return -1;
        }

        break;

    case SBX_OUT_NOHOOK:
        return 0;

    default:
        return sbx_get_str(&rd, &r->message);
    }

    if (sbx_get_count(&rd, &r->nheaders, SBX_RUN_MAX_HEADERS, 8)) {
        return -1;
    }

    r->headers = rd;

    if (sbx_run_skip_headers(&rd, r->nheaders) || sbx_get_u8(&rd, &r->has_body)
        || sbx_get_str(&rd, &r->body))
    {
        return -1;
    }

    return 0;
}


/* RFC 3629 UTF-8, without overlong forms and surrogates */

static int
sbx_run_utf8_valid(const uint8_t *p, size_t len)
{
    size_t    i = 0, n, k;
    uint32_t  c, min;

    while (i < len) {
        c = p[i];

        if (c < 0x80) {
            i++;
            continue;
        }

        if ((c & 0xe0) == 0xc0) {
            n = 1; c &= 0x1f; min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            n = 2; c &= 0x0f; min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            n = 3; c &= 0x07; min = 0x10000;
        } else {
            return 0;
        }

        if (len - i <= n) {
            return 0;
        }

        for (k = 1; k <= n; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return 0;
            }

            c = (c << 6) | (p[i + k] & 0x3f);
        }

        if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
            return 0;
        }

        i += n + 1;
    }

    return 1;
}


/* sets t.body (or t.body_base64) from the result */

static void
sbx_run_set_body(lua_State *L, int t, uint8_t has, sbx_str_t *body)
{
    int          n;
    luaL_Buffer  b;
    char        *o;

    if (!has) {
        lua_getglobal(L, "sbx_run_cjson");
        lua_getfield(L, -1, "null");
        lua_setfield(L, t, "body");
        lua_pop(L, 1);
        return;
    }

    if (sbx_run_utf8_valid(body->data, body->len)) {
        lua_pushlstring(L, (const char *) body->data, body->len);
        lua_setfield(L, t, "body");
        return;
    }

    o = luaL_buffinitsize(L, &b, (body->len + 2) / 3 * 4 + 1);
    n = EVP_EncodeBlock((unsigned char *) o, body->data, (int) body->len);
    luaL_pushresultsize(&b, (size_t) n);
    lua_setfield(L, t, "body_base64");
}


/* adds one field to a headers object: a repeated name becomes an array */

static void
sbx_run_add_header(lua_State *L, int h, const char *name, size_t nlen,
    const char *value, size_t vlen)
{
    lua_pushlstring(L, name, nlen);
    lua_pushvalue(L, -1);

    switch (lua_rawget(L, h)) {

    case LUA_TNIL:
        lua_pop(L, 1);
        lua_pushlstring(L, value, vlen);
        break;

    case LUA_TSTRING:
        lua_createtable(L, 2, 0);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
        lua_pushlstring(L, value, vlen);
        lua_rawseti(L, -2, 2);
        break;

    default:
        lua_pushlstring(L, value, vlen);
        lua_rawseti(L, -2, (lua_Integer) lua_rawlen(L, -2) + 1);
        break;
    }

    lua_rawset(L, h);
}


/*
 * Pushes the JSON shape of a result: headers as an object (repeated
 * fields become arrays).  With `flat`, pushes instead the normalized form
 * (headers as a flat name/value array) the CALL writer reads.
 */

static void
sbx_run_push_result(lua_State *L, sbx_run_result_t *r, int flat)
{
    int        t, h;
    uint32_t   i;
    sbx_rd_t   rd;
    sbx_str_t  name, value;

    lua_createtable(L, 0, 5);
    t = lua_gettop(L);

    if (r->outcome == SBX_OUT_RESPONSE) {
        lua_pushinteger(L, r->status);
        lua_setfield(L, t, "status");

    } else {
        lua_pushlstring(L, (const char *) r->uri.data, r->uri.len);
        lua_setfield(L, t, "uri");
        lua_pushlstring(L, (const char *) r->args.data, r->args.len);
        lua_setfield(L, t, "args");
    }

    lua_createtable(L, flat ? (int) r->nheaders * 2 : 0,
                    flat ? 0 : (int) r->nheaders);
    h = lua_gettop(L);
    rd = r->headers;

    for (i = 0; i < r->nheaders; i++) {
        if (sbx_get_str(&rd, &name) || sbx_get_str(&rd, &value)) {
            break;
        }

        if (flat) {
            lua_pushlstring(L, (const char *) name.data, name.len);
            lua_rawseti(L, h, 2 * i + 1);
            lua_pushlstring(L, (const char *) value.data, value.len);
            lua_rawseti(L, h, 2 * i + 2);
            continue;
        }

        sbx_run_add_header(L, h, (const char *) name.data, name.len,
                           (const char *) value.data, value.len);
    }

    lua_setfield(L, t, "headers");

    if (flat) {
        if (r->has_body) {
            lua_pushlstring(L, (const char *) r->body.data, r->body.len);
            lua_setfield(L, t, "body");
        }

    } else {
        sbx_run_set_body(L, t, r->has_body, &r->body);
    }
}


/*
 * Pushes a normalized request or response (as read from a file) in the
 * JSON output shape: what goes on unchanged when the script has no such
 * hook.
 */

static void
sbx_run_push_passthrough(lua_State *L, int n, int response)
{
    int          t, h, hl;
    size_t       nlen, vlen, blen;
    lua_Integer  i, cnt;
    sbx_str_t    body;
    const char  *name, *value;

    lua_createtable(L, 0, 5);
    t = lua_gettop(L);

    if (response) {
        lua_getfield(L, n, "status");
        lua_setfield(L, t, "status");

    } else {
        lua_getfield(L, n, "uri");
        lua_setfield(L, t, "uri");
        lua_getfield(L, n, "args");
        lua_setfield(L, t, "args");
    }

    lua_getfield(L, n, "headers");
    hl = lua_gettop(L);
    cnt = (lua_Integer) lua_rawlen(L, hl);
    lua_newtable(L);
    h = lua_gettop(L);

    for (i = 1; i + 1 <= cnt; i += 2) {
        lua_rawgeti(L, hl, i);
        lua_rawgeti(L, hl, i + 1);
        name = lua_tolstring(L, -2, &nlen);
        value = lua_tolstring(L, -1, &vlen);
        sbx_run_add_header(L, h, name, nlen, value, vlen);
        lua_pop(L, 2);
    }

    lua_setfield(L, t, "headers");
    lua_pop(L, 1);

    if (lua_getfield(L, n, "body") == LUA_TSTRING) {
        body.data = (const uint8_t *) lua_tolstring(L, -1, &blen);
        body.len = blen;
        sbx_run_set_body(L, t, 1, &body);

    } else {
        sbx_run_set_body(L, t, 0, NULL);
    }

    lua_pop(L, 1);
}


/* encodes the table on top and writes it to stdout as one line */

static int
sbx_run_print_json(lua_State *L)
{
    size_t       len, i, n;
    char        *p;
    const char  *s;

    lua_getglobal(L, "sbx_run_cjson");
    lua_getfield(L, -1, "encode");
    lua_remove(L, -2);
    lua_insert(L, -2);

    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        sbx_run_printf(2, "sbx-lua-helper: cannot encode the result: %s\n",
                       lua_tostring(L, -1));
        return -1;
    }

    s = lua_tolstring(L, -1, &len);

    /*
     * lua-cjson 2.1.0 always writes "/" as "\/": undo that one escape for
     * readable URIs (escapes are pairs, so "\\/" stays as it is).
     */
    p = malloc(len + 1);
    if (p == NULL) {
        sbx_run_write(1, s, len);

    } else {
        for (i = 0, n = 0; i < len; i++) {
            if (s[i] == '\\' && i + 1 < len) {
                if (s[i + 1] != '/') {
                    p[n++] = s[i];
                }

                p[n++] = s[++i];
                continue;
            }

            p[n++] = s[i];
        }

        p[n++] = '\n';
        sbx_run_write(1, p, n);
        free(p);
    }

    lua_pop(L, 1);

    return 0;
}


static const char *
sbx_run_failure(unsigned outcome)
{
    switch (outcome) {
    case SBX_OUT_SCRIPT_ERROR:
        return "script error: ";
    case SBX_OUT_BAD_RETURN:
        return "invalid return value: ";
    default:
        return "";
    }
}


static const char *
sbx_run_status(unsigned outcome)
{
    return outcome == SBX_OUT_TIMEOUT ? "504 transform_timeout"
                                      : "500 transform_error";
}


/* runs one hook; prints logs and usage; 0, or 1 on failure */

static int
sbx_run_hook(sbx_engine_t *e, unsigned hook, const uint8_t *payload,
    size_t len, sbx_run_result_t *r)
{
    const char  *name;
    uint8_t     *out;
    size_t       outlen;
    char         prefix[64];

    name = hook == SBX_HOOK_RESPONSE ? "response" : "request";
    sbx_run_phase = hook == SBX_HOOK_RESPONSE ? "response hook"
                                              : "request hook";

    if (sbx_engine_call(e, 0, hook, payload, len, &out, &outlen) != 0
        || sbx_run_read_result(out + SBX_FRAME_HDR_SIZE, outlen, r) != 0)
    {
        sbx_run_printf(2, "%s hook: internal error: the engine failed\n",
                       name);
        return 1;
    }

    sbx_run_printf(2, "%s hook: instructions=%llu memory_peak=%llu "
                   "time_us=%u\n", name,
                   (unsigned long long) r->instructions,
                   (unsigned long long) r->memory_peak, r->time_us);

    if (r->outcome >= SBX_OUT_SCRIPT_ERROR) {
        snprintf(prefix, sizeof(prefix), "%s hook: %s", name,
                 sbx_run_failure(r->outcome));
        sbx_run_print_line(prefix, r->message.data, r->message.len);
        sbx_run_printf(2, "the gateway answers %s\n",
                       sbx_run_status(r->outcome));
        return 1;
    }

    if (r->outcome == SBX_OUT_NOHOOK) {
        sbx_run_printf(2, "%s hook: none, the %s passes unchanged\n", name,
                       name);
    }

    return 0;
}


static lua_State *
sbx_run_host_state(void)
{
    lua_State  *L;

    L = luaL_newstate();
    if (L == NULL) {
        return NULL;
    }

    /* a lua-cjson instance of the host's own, default configuration */
    luaopen_cjson(L);
    lua_getfield(L, -1, "new");

    if (lua_pcall(L, 0, 1, 0) != LUA_OK || lua_type(L, -1) != LUA_TTABLE) {
        lua_close(L);
        return NULL;
    }

    lua_setglobal(L, "sbx_run_cjson");
    lua_settop(L, 0);

    return L;
}


static void
sbx_run_connector_name(lua_State *L, int req, const char *path,
    sbx_script_t *s)
{
    size_t       len;
    const char  *p;

    if (lua_getfield(L, req, "connector") == LUA_TSTRING) {
        /* anchored in req */
        s->name.data = (const uint8_t *) lua_tolstring(L, -1, &len);
        s->name.len = len;
        lua_pop(L, 1);
        return;
    }

    lua_pop(L, 1);

    p = strrchr(path, '/');
    p = p ? p + 1 : path;
    len = strlen(p);

    if (len > 4 && strcmp(p + len - 4, ".lua") == 0) {
        len -= 4;
    }

    s->name.data = (const uint8_t *) p;
    s->name.len = len;
}


int
sbx_run(int argc, char **argv)
{
    int                i, req, res, rc, problems;
    char              *src, *reqtext, *restext, err[1024], out[8192];
    const char        *path = NULL, *reqpath = NULL, *respath = NULL;
    const char        *chunkname = NULL;
    size_t             len, reqlen, reslen = 0, calllen;
    uint8_t           *call;
    uint64_t           as;
    unsigned           hooks;
    lua_State         *L;
    sbx_engine_t      *e;
    sbx_script_t       s;
    sbx_run_result_t   r;
    struct sigaction   sa;
    struct itimerval   it;

    memset(&s, 0, sizeof(s));
    s.memory = SBX_DEFAULT_MEMORY;
    s.instructions = SBX_DEFAULT_INSTRUCTIONS;
    s.timeout_ms = SBX_DEFAULT_TIMEOUT_MS;

    for (i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--request") == 0 && i + 1 < argc) {
            reqpath = argv[++i];

        } else if (strcmp(argv[i], "--response") == 0 && i + 1 < argc) {
            respath = argv[++i];

        } else if (strcmp(argv[i], "--capabilities") == 0 && i + 1 < argc) {
            if (sbx_caps_parse(argv[++i], &s.caps, err, sizeof(err)) != 0) {
                sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
                return 2;
            }

        } else if (strcmp(argv[i], "--limits") == 0 && i + 1 < argc) {
            if (sbx_parse_limits(argv[++i], &s, err, sizeof(err)) != 0) {
                sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
                return 2;
            }

        } else if (strcmp(argv[i], "--chunkname") == 0 && i + 1 < argc) {
            chunkname = argv[++i];

        } else if (path == NULL && (argv[i][0] != '-' || argv[i][1] == '\0'))
        {
            path = argv[i];

        } else {
            sbx_run_usage();
            return 2;
        }
    }

    if (path == NULL || reqpath == NULL) {
        sbx_run_usage();
        return 2;
    }

    if (chunkname == NULL) {
        chunkname = strcmp(path, "-") == 0 ? "stdin" : path;
    }

    /* everything is read before the sandbox */

    rc = sbx_read_file(path, &src, &len, SBX_MAX_SCRIPT_SIZE, err,
                       sizeof(err));

    if (rc != 0) {
        /* too large: the script's fault; unreadable: the command's */
        sbx_run_printf(2, "%s%s\n", rc == SBX_FILE_TOO_LARGE ? ""
                                    : "sbx-lua-helper: ", err);
        return rc == SBX_FILE_TOO_LARGE ? 1 : 2;
    }

    if (sbx_read_file(reqpath, &reqtext, &reqlen, SBX_RUN_MAX_INPUT, err,
                      sizeof(err)) != 0
        || (respath && sbx_read_file(respath, &restext, &reslen,
                                     SBX_RUN_MAX_INPUT, err, sizeof(err))
                       != 0))
    {
        sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
        return 2;
    }

    sbx_clean_environment();

    L = sbx_run_host_state();
    if (L == NULL) {
        sbx_run_printf(2, "sbx-lua-helper: cannot create the JSON state\n");
        return 1;
    }

    /* 1: request file, 2: normalized request, [3: file, 4: response] */

    if (sbx_run_decode(L, reqpath, reqtext, reqlen, err, sizeof(err)) != 0
        || sbx_run_norm_request(L, 1, reqpath, err, sizeof(err)) != 0)
    {
        sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
        return 2;
    }

    req = 2;
    res = 0;

    if (respath) {
        if (sbx_run_decode(L, respath, restext, reslen, err, sizeof(err))
            != 0
            || sbx_run_norm_response(L, 3, respath, err, sizeof(err)) != 0)
        {
            sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
            return 2;
        }

        res = 4;
        free(restext);
    }

    free(reqtext);

    call = sbx_run_build_call(L, req, 0, &calllen);
    if (call == NULL) {
        sbx_run_printf(2, "sbx-lua-helper: out of memory\n");
        return 1;
    }

    sbx_run_connector_name(L, req, chunkname, &s);
    s.chunkname.data = (const uint8_t *) chunkname;
    s.chunkname.len = strlen(chunkname);
    s.source.data = (const uint8_t *) src;
    s.source.len = len;

    e = sbx_engine_create(err, sizeof(err));
    if (e == NULL) {
        sbx_run_printf(2, "sbx-lua-helper: %s\n", err);
        return 1;
    }

    /*
     * The hook's own deadline is checked between instructions; a long C
     * call (pattern matching, sorting) is stopped by this backstop, as the
     * worker's wall-clock kill stops it in the gateway.
     */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = sbx_run_alarm;
    sigemptyset(&sa.sa_mask);
    (void) sigaction(SIGALRM, &sa, NULL);
    (void) sigaction(SIGXCPU, &sa, NULL);

    memset(&it, 0, sizeof(it));
    it.it_value.tv_sec = (s.timeout_ms * 3ULL + 1000) / 1000;
    it.it_value.tv_usec = (s.timeout_ms * 3ULL + 1000) % 1000 * 1000;
    (void) setitimer(ITIMER_REAL, &it, NULL);

    /* the address-space backstop stays well above the Lua cap */
    as = s.memory * 4 + (1ULL << 30);
    if (as < SBX_RUN_AS_MIN) {
        as = SBX_RUN_AS_MIN;
    }

    if (sbx_sandbox_apply(SBX_PROFILE_CLI, as, err, sizeof(err)) != 0) {
        sbx_run_printf(2, "sbx-lua-helper: sandbox: %s\n", err);
        return 1;
    }

    /* from here on: writes to fds 1 and 2 only */

    problems = sbx_engine_check(e, &s, out, sizeof(out));

    if (problems) {
        sbx_run_write(2, out, strlen(out));
        return 1;
    }

    if (sbx_engine_load(e, &s, &hooks, err, sizeof(err)) < 0) {
        sbx_run_print_line("", (const uint8_t *) err, strlen(err));
        return 1;
    }

    sbx_engine_ready(e, 0);

    rc = sbx_run_hook(e, SBX_HOOK_REQUEST, call, calllen, &r);
    free(call);

    if (rc != 0) {
        return 1;
    }

    if (r.outcome == SBX_OUT_RESPONSE) {
        if (res) {
            sbx_run_printf(2, "response hook: not run, the request hook "
                           "answered the client\n");
        }

        sbx_run_push_result(L, &r, 0);
        return sbx_run_print_json(L) == 0 ? 0 : 1;
    }

    if (!res) {
        if (r.outcome == SBX_OUT_REQUEST) {
            sbx_run_push_result(L, &r, 0);

        } else {
            sbx_run_push_passthrough(L, req, 0);
        }

        return sbx_run_print_json(L) == 0 ? 0 : 1;
    }

    /* the response hook gets the request as it went upstream */

    if (r.outcome == SBX_OUT_REQUEST) {
        sbx_run_push_result(L, &r, 1);

        lua_getfield(L, req, "method");
        lua_setfield(L, -2, "method");
        lua_getfield(L, req, "id");
        lua_setfield(L, -2, "id");
        lua_getfield(L, req, "ip");
        lua_setfield(L, -2, "ip");
        lua_getfield(L, req, "country");
        lua_setfield(L, -2, "country");
        lua_getfield(L, req, "continent");
        lua_setfield(L, -2, "continent");

        req = lua_gettop(L);
    }

    call = sbx_run_build_call(L, req, res, &calllen);
    if (call == NULL) {
        sbx_run_printf(2, "sbx-lua-helper: out of memory\n");
        return 1;
    }

    rc = sbx_run_hook(e, SBX_HOOK_RESPONSE, call, calllen, &r);
    free(call);

    if (rc != 0) {
        return 1;
    }

    if (r.outcome == SBX_OUT_RESPONSE) {
        sbx_run_push_result(L, &r, 0);

    } else if (r.outcome == SBX_OUT_NOHOOK) {
        sbx_run_push_passthrough(L, res, 1);

    } else {
        sbx_run_printf(2, "response hook: invalid return value: the "
                       "response hook must return a response\n"
                       "the gateway answers 500 transform_error\n");
        return 1;
    }

    return sbx_run_print_json(L) == 0 ? 0 : 1;
}
