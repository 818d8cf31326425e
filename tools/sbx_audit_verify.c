/*
 * sbx-audit-verify: checks the hash chain of an sbx_audit_log file.
 *
 *   sbx-audit-verify [--quiet] FILE
 *
 * Each line of a file written with "sbx_audit_log PATH chain=on" is a JSON
 * object whose "seq" is its number in the file (one more than the line
 * before) and whose "prev" is the hex SHA-256 of the previous line (its
 * bytes without the newline); the first line has "prev": null.
 *
 * Prints "OK N lines" and exits 0 when every line verifies, otherwise
 * prints "BROKEN at line N: why" for the first line that does not and
 * exits 1:
 *
 *   - a line that was edited breaks the link to the line after it;
 *   - a deleted, inserted or moved line breaks the link at its place;
 *   - a line that is not a whole JSON object (torn, truncated, not UTF-8,
 *     a control character, NaN or Infinity, nested deeper than 1000)
 *     breaks there.
 *
 * Truncation at the end of the file removes whole lines without leaving a
 * trace in the lines kept: compare the last "seq" with what you expect.
 * Exit status 2: usage, or the file cannot be read.
 *
 * The file is read a line at a time (memory grows with the longest line,
 * not with the file).  Lines are decoded with lua-cjson in a bare Lua
 * state (no libraries opened: the state only ever runs cjson.decode).
 * sbx_av_line() is the line parser; fuzz/fuzz_audit.c drives it.
 */

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <openssl/evp.h>


#define SBX_AV_HASH_LEN   32
#define SBX_AV_SEQ_MAX    9007199254740992.0     /* 2^53: exact in JSON */


int luaopen_cjson(lua_State *L);


typedef struct {
    lua_State          *L;
    int                 decode;         /* registry ref: cjson.decode */
    const void         *null;           /* cjson.null: a light userdata */
    unsigned long long  lines;          /* lines verified */
    long long           prev_seq;
    unsigned char       prev_hash[SBX_AV_HASH_LEN];
    char                why[160];
} sbx_av_t;


/*
 * Strict UTF-8 (no overlong forms, no surrogates, nothing above U+10FFFF)
 * and no control characters: JSON has none in strings, and the module
 * writes no whitespace but spaces between tokens.
 */

static int
sbx_av_utf8(const unsigned char *p, size_t len)
{
    size_t         i, n, k;
    unsigned char  c;
    unsigned long  cp, min;

    for (i = 0; i < len; i += n) {
        c = p[i];

        if (c < 0x80) {
            if (c < 0x20) {
                return 0;
            }

            n = 1;
            continue;
        }

        if ((c & 0xe0) == 0xc0) {
            n = 2; cp = c & 0x1f; min = 0x80;

        } else if ((c & 0xf0) == 0xe0) {
            n = 3; cp = c & 0x0f; min = 0x800;

        } else if ((c & 0xf8) == 0xf0) {
            n = 4; cp = c & 0x07; min = 0x10000;

        } else {
            return 0;
        }

        if (len - i < n) {
            return 0;
        }

        for (k = 1; k < n; k++) {
            if ((p[i + k] & 0xc0) != 0x80) {
                return 0;
            }

            cp = (cp << 6) | (p[i + k] & 0x3f);
        }

        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return 0;
        }
    }

    return 1;
}


static int
sbx_av_fail(sbx_av_t *av, const char *why)
{
    snprintf(av->why, sizeof(av->why), "%s", why);
    return -1;
}


static void
sbx_av_hex(const unsigned char *p, size_t len, char *out)
{
    static const char  hex[] = "0123456789abcdef";

    while (len--) {
        *out++ = hex[*p >> 4];
        *out++ = hex[*p++ & 0xf];
    }

    *out = '\0';
}


static int
sbx_av_sha256(const unsigned char *p, size_t len, unsigned char *md)
{
    unsigned int  n = SBX_AV_HASH_LEN;

    return EVP_Digest(p, len, md, &n, EVP_sha256(), NULL) == 1 ? 0 : -1;
}


/* protected: cjson.decode(line) raises on bad JSON and on memory errors */

static int
sbx_av_decode(lua_State *L)
{
    size_t       len;
    const char  *p;

    p = lua_touserdata(L, 1);
    len = (size_t) lua_tointeger(L, 2);

    lua_rawgeti(L, LUA_REGISTRYINDEX, (lua_Integer) lua_tointeger(L, 3));
    lua_pushlstring(L, p, len);
    lua_call(L, 1, 1);

    return 1;
}


int
sbx_av_init(sbx_av_t *av)
{
    memset(av, 0, sizeof(sbx_av_t));

    av->L = luaL_newstate();
    if (av->L == NULL) {
        return -1;
    }

    luaL_requiref(av->L, "cjson", luaopen_cjson, 0);

    /* reject what JSON does not have: NaN, Infinity, hex numbers */
    lua_getfield(av->L, -1, "decode_invalid_numbers");
    lua_pushboolean(av->L, 0);
    lua_call(av->L, 1, 0);

    lua_getfield(av->L, -1, "null");
    av->null = lua_touserdata(av->L, -1);
    lua_pop(av->L, 1);

    lua_getfield(av->L, -1, "decode");
    av->decode = luaL_ref(av->L, LUA_REGISTRYINDEX);
    lua_settop(av->L, 0);

    return 0;
}


void
sbx_av_reset(sbx_av_t *av)
{
    av->lines = 0;
    av->prev_seq = 0;
    av->why[0] = '\0';
    lua_settop(av->L, 0);
    lua_gc(av->L, LUA_GCCOLLECT);
}


void
sbx_av_free(sbx_av_t *av)
{
    if (av->L) {
        lua_close(av->L);
        av->L = NULL;
    }
}


/*
 * Checks the next line (without its newline) against the lines before it.
 * Returns 0 if it verifies, -1 with av->why set if not.
 */

int
sbx_av_line(sbx_av_t *av, const unsigned char *line, size_t len)
{
    int            rc;
    char           hex[2 * SBX_AV_HASH_LEN + 1], buf[160];
    size_t         i, plen;
    double         d;
    long long      seq;
    lua_State     *L;
    const char    *prev;
    unsigned char  md[SBX_AV_HASH_LEN];

    L = av->L;
    lua_settop(L, 0);

    for (i = 0; i < len && line[i] == ' '; i++) {
        /* void */
    }

    /* an object, not an array or a scalar; and text, not bytes */
    if (i == len || line[i] != '{' || !sbx_av_utf8(line, len)) {
        return sbx_av_fail(av, "not a JSON object");
    }

    lua_pushcfunction(L, sbx_av_decode);
    lua_pushlightuserdata(L, (void *) line);
    lua_pushinteger(L, (lua_Integer) len);
    lua_pushinteger(L, av->decode);

    rc = lua_pcall(L, 3, 1, 0);

    if (rc != LUA_OK || lua_type(L, -1) != LUA_TTABLE) {
        lua_settop(L, 0);
        return sbx_av_fail(av, "not a JSON object");
    }

    lua_getfield(L, 1, "prev");

    if (lua_isnil(L, -1)) {
        lua_settop(L, 0);
        return sbx_av_fail(av, "no \"prev\" field (written with chain=off?)");
    }

    lua_getfield(L, 1, "seq");

    d = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;

    if (!(d >= 1 && d <= SBX_AV_SEQ_MAX) || d != (double) (long long) d) {
        lua_settop(L, 0);
        return sbx_av_fail(av, "\"seq\" is not a positive integer");
    }

    seq = (long long) d;
    prev = NULL;
    plen = 0;

    if (lua_type(L, 2) == LUA_TSTRING) {
        prev = lua_tolstring(L, 2, &plen);
    }

    if (av->lines == 0) {
        if (lua_type(L, 2) != LUA_TLIGHTUSERDATA
            || lua_touserdata(L, 2) != av->null)
        {
            lua_settop(L, 0);
            return sbx_av_fail(av, "\"prev\" is not null on the first line: "
                               "lines before it are missing");
        }

        if (seq != 1) {
            lua_settop(L, 0);
            snprintf(buf, sizeof(buf), "\"seq\" is %lld on the first line: "
                     "lines before it are missing", seq);
            return sbx_av_fail(av, buf);
        }

    } else {
        sbx_av_hex(av->prev_hash, SBX_AV_HASH_LEN, hex);

        if (prev == NULL || plen != 2 * SBX_AV_HASH_LEN
            || memcmp(prev, hex, plen) != 0)
        {
            lua_settop(L, 0);
            snprintf(buf, sizeof(buf), "\"prev\" is not the SHA-256 of line "
                     "%llu: line %llu was changed, or a line was deleted, "
                     "inserted or moved here", av->lines, av->lines);
            return sbx_av_fail(av, buf);
        }

        if (seq != av->prev_seq + 1) {
            lua_settop(L, 0);
            snprintf(buf, sizeof(buf), "\"seq\" is %lld after %lld",
                     seq, av->prev_seq);
            return sbx_av_fail(av, buf);
        }
    }

    lua_settop(L, 0);

    if (sbx_av_sha256(line, len, md) != 0) {
        return sbx_av_fail(av, "SHA-256 failed");
    }

    memcpy(av->prev_hash, md, SBX_AV_HASH_LEN);
    av->prev_seq = seq;
    av->lines++;

    /* decoded tables are garbage now: keep the state small */
    if ((av->lines & 1023) == 0) {
        lua_gc(L, LUA_GCCOLLECT);
    }

    return 0;
}


#ifndef SBX_AV_NO_MAIN

static int
sbx_av_usage(void)
{
    fprintf(stderr, "usage: sbx-audit-verify [--quiet] FILE\n");
    return 2;
}


int
main(int argc, char **argv)
{
    int        quiet = 0, rc = 0;
    FILE      *f;
    char      *line = NULL;
    size_t     size = 0;
    ssize_t    n;
    sbx_av_t   av;

    argv++;
    argc--;

    if (argc > 0
        && (strcmp(argv[0], "-q") == 0 || strcmp(argv[0], "--quiet") == 0))
    {
        quiet = 1;
        argv++;
        argc--;
    }

    if (argc != 1 || strcmp(argv[0], "-h") == 0
        || strcmp(argv[0], "--help") == 0)
    {
        return sbx_av_usage();
    }

    f = fopen(argv[0], "rb");
    if (f == NULL) {
        fprintf(stderr, "sbx-audit-verify: %s: %s\n", argv[0],
                strerror(errno));
        return 2;
    }

    if (sbx_av_init(&av) != 0) {
        fprintf(stderr, "sbx-audit-verify: out of memory\n");
        fclose(f);
        return 2;
    }

    for ( ;; ) {
        errno = 0;
        n = getline(&line, &size, f);

        if (n < 0) {
            if (errno != 0 || ferror(f)) {
                fprintf(stderr, "sbx-audit-verify: %s: %s\n", argv[0],
                        errno ? strerror(errno) : "read error");
                rc = 2;
            }

            break;
        }

        if (line[n - 1] != '\n') {
            snprintf(av.why, sizeof(av.why), "incomplete line (no newline "
                     "at the end of the file)");
            rc = 1;
            break;
        }

        if (sbx_av_line(&av, (unsigned char *) line, (size_t) n - 1) != 0) {
            rc = 1;
            break;
        }
    }

    if (rc == 0 && !quiet) {
        printf("OK %llu lines\n", av.lines);

    } else if (rc == 1 && !quiet) {
        printf("BROKEN at line %llu: %s\n", av.lines + 1, av.why);
    }

    free(line);
    fclose(f);
    sbx_av_free(&av);

    return rc;
}

#endif
