/*
 * sbx_engine.c: one lua_State per helper; per-call limits (memory through
 * the allocator, instructions and a monotonic deadline through a count hook,
 * all sticky once tripped); a fresh environment and a fresh thread for every
 * call; strict reading of what a hook returns.
 *
 * Isolation between calls: a call's top level runs again with a new _ENV
 * table, so its locals, upvalues, hook closures and globals are new objects.
 * Library tables reach a call as fresh copies (made on first use), the real
 * string table is reachable only through method calls on strings and holds
 * no mutable state, the string metatable is protected, __gc is refused, the
 * PRNG is reseeded by the host before every call, and lua-cjson is a
 * host-owned instance whose configuration functions are never exposed.
 * What is left in the state after a call is garbage nothing can reach.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <malloc.h>
#ifdef SBX_SANITIZE
#include <sanitizer/allocator_interface.h>
#endif
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/random.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "sbx_engine.h"
#include "sbx_lib.h"
#include "sbx_check.h"


/* luaL_loadbufferx's own message for this names no file or line */
#define SBX_BINARY_CHUNK                                                      \
    "precompiled (binary) chunks are refused: give the Lua source text"


typedef struct {
    char               *name;
    int                 chunk_ref;      /* compiled top level */
    int                 mt_ref;         /* metatable of each call's _ENV */
    uint32_t            caps;
    uint64_t            memory;
    uint64_t            instructions;
    uint32_t            timeout_ms;
    unsigned            hooks;
} sbx_script_slot_t;


struct sbx_engine_s {
    lua_State          *L;

    /* allocator */
    size_t              used;
    size_t              limit;          /* 0: none */
    size_t              peak;
    int                 refused;
    void               *refused_ptr;    /* the refused request */
    size_t              refused_size;

    /* current call */
    uint64_t            instructions;
    uint64_t            max_instructions;
    struct timespec     deadline;
    int                 tripped;

    /* lines the script logged during the current call */
    uint32_t            nlogs;
    uint32_t            log_bytes;
    int                 log_dropped;
    struct {
        uint8_t         level;
        uint32_t        off;
        uint32_t        len;
    }                   logs[SBX_MAX_LOG_LINES];
    char                log_buf[SBX_MAX_LOG_BYTES];

    int                 randomseed_ref;
    EVP_CIPHER_CTX     *rng;            /* seeds of math.randomseed */

    size_t              baseline;
    size_t              start_used;

    /* the helper's own heap outside Lua (lua-cjson's buffers) */
    uint64_t            as;             /* RLIMIT_AS, 0: none */
    size_t              native_base;
    int                 recycle;

    sbx_script_slot_t  *scripts;
    unsigned            nscripts;

    uint8_t            *out;
    size_t              out_size;
};


static sbx_engine_t *
sbx_engine(lua_State *L)
{
    return *(sbx_engine_t **) lua_getextraspace(L);
}


/* allocator: counts every byte; refuses past the call's limit */

static void *
sbx_alloc(void *ud, void *ptr, size_t osize, size_t nsize)
{
    sbx_engine_t  *e = ud;
    size_t         old;
    void          *p;

    old = ptr ? osize : 0;

    if (nsize == 0) {
        free(ptr);
        e->used -= old;
        return NULL;
    }

    /*
     * Lua runs an emergency collection after a refusal and asks again
     * once, for the same block and size: a second refusal is a real trip.
     * A refusal that is not asked again (luaL_Buffer calls the allocator
     * directly and raises a plain error) is a trip as well.  Either stays
     * recorded even if the script catches the error.
     */
    if (e->refused && nsize != 0
        && (ptr != e->refused_ptr || nsize != e->refused_size))
    {
        e->tripped = SBX_TRIP_MEMORY;
    }

    if (nsize > old && e->limit
        && (nsize - old > e->limit || e->used + (nsize - old) > e->limit))
    {
        if (e->refused) {
            e->tripped = SBX_TRIP_MEMORY;
        }

        e->refused = 1;
        e->refused_ptr = ptr;
        e->refused_size = nsize;
        return NULL;
    }

    p = realloc(ptr, nsize);
    if (p == NULL) {
        e->tripped = SBX_TRIP_MEMORY;
        return NULL;
    }

    e->refused = 0;
    e->used = e->used - old + nsize;

    if (e->used > e->peak) {
        e->peak = e->used;
    }

    return p;
}


static int
sbx_deadline_passed(sbx_engine_t *e)
{
    struct timespec  now;

    clock_gettime(CLOCK_MONOTONIC, &now);

    return now.tv_sec > e->deadline.tv_sec
           || (now.tv_sec == e->deadline.tv_sec
               && now.tv_nsec >= e->deadline.tv_nsec);
}


static const char *
sbx_trip_message(int trip)
{
    switch (trip) {
    case SBX_TRIP_INSTRUCTIONS:
        return "instruction limit exceeded";
    case SBX_TRIP_MEMORY:
        return "memory limit exceeded";
    default:
        return "time limit exceeded";
    }
}


static void sbx_hook(lua_State *L, lua_Debug *ar);


static int
sbx_raise_trip(lua_State *L)
{
    sbx_engine_t  *e = sbx_engine(L);

    /* from now on this thread raises again at its next instruction */
    lua_sethook(L, sbx_hook, LUA_MASKCOUNT, 1);

    lua_pushstring(L, sbx_trip_message(e->tripped));
    return lua_error(L);
}


static void
sbx_hook(lua_State *L, lua_Debug *ar)
{
    sbx_engine_t  *e = sbx_engine(L);

    (void) ar;

    if (e->tripped == SBX_TRIP_NONE) {
        e->instructions += SBX_HOOK_PERIOD;

        if (e->instructions > e->max_instructions) {
            e->tripped = SBX_TRIP_INSTRUCTIONS;

        } else if (sbx_deadline_passed(e)) {
            e->tripped = SBX_TRIP_TIMEOUT;

        } else {
            return;
        }
    }

    sbx_raise_trip(L);
}


void
sbx_charge(lua_State *L, uint64_t n)
{
    sbx_engine_t  *e = sbx_engine(L);

    if (e->tripped == SBX_TRIP_NONE) {
        e->instructions += n;

        if (e->instructions > e->max_instructions) {
            e->tripped = SBX_TRIP_INSTRUCTIONS;
        }
    }

    sbx_check_tripped(L);
}


void
sbx_check_tripped(lua_State *L)
{
    if (sbx_engine(L)->tripped != SBX_TRIP_NONE) {
        sbx_raise_trip(L);
    }
}


int
sbx_tripped(lua_State *L)
{
    return sbx_engine(L)->tripped;
}


size_t
sbx_memory_left(lua_State *L)
{
    sbx_engine_t  *e = sbx_engine(L);

    if (e->limit == 0) {
        return SIZE_MAX;
    }

    return e->used < e->limit ? e->limit - e->used : 0;
}


void
sbx_trip_memory(lua_State *L)
{
    sbx_engine(L)->tripped = SBX_TRIP_MEMORY;
    sbx_raise_trip(L);
}


/* print() and the log capability */

int
sbx_log_args(lua_State *L, int level, const char *fname)
{
    int            i, n;
    size_t         len, room;
    const char    *s;
    luaL_Buffer    b;
    sbx_engine_t  *e = sbx_engine(L);

    (void) fname;

    n = lua_gettop(L);
    luaL_buffinit(L, &b);

    /*
     * The buffer's box stays on the top of the stack: each argument is
     * pushed, cut, and taken with luaL_addvalue, never added from below.
     */
    for (i = 1; i <= n; i++) {
        if (i > 1) {
            luaL_addchar(&b, '\t');
        }

        s = luaL_tolstring(L, i, &len);

        if (len > SBX_MAX_LOG_BYTES) {
            lua_pushlstring(L, s, SBX_MAX_LOG_BYTES);
            lua_remove(L, -2);
        }

        luaL_addvalue(&b);
    }

    luaL_pushresult(&b);
    s = lua_tolstring(L, -1, &len);

    if (e->nlogs >= SBX_MAX_LOG_LINES || e->log_bytes >= SBX_MAX_LOG_BYTES) {
        e->log_dropped = 1;
        return 0;
    }

    room = SBX_MAX_LOG_BYTES - e->log_bytes;
    if (len > room) {
        len = room;
        e->log_dropped = 1;
    }

    memcpy(e->log_buf + e->log_bytes, s, len);
    e->logs[e->nlogs].level = (uint8_t) level;
    e->logs[e->nlogs].off = e->log_bytes;
    e->logs[e->nlogs].len = (uint32_t) len;
    e->nlogs++;
    e->log_bytes += (uint32_t) len;

    return 0;
}


/*
 * The seeds of each call's math.randomseed: a ChaCha20 keystream (OpenSSL
 * libcrypto) keyed from getrandom() before the sandbox.  Lua's xoshiro256**
 * gives its state away to a script that reads a few math.random(0) values,
 * and with it the seeds of its own call; a non-cryptographic host PRNG
 * (xoroshiro128+ before) would then give away the seeds of the calls that
 * follow, another connector's included.  A keystream does not: one call's
 * seeds say nothing of the next.  No system call once set up.
 */

static int
sbx_rng_init(sbx_engine_t *e)
{
    unsigned char  key[32], iv[16];

    if (getrandom(key, sizeof(key), 0) != sizeof(key)
        || getrandom(iv, sizeof(iv), 0) != sizeof(iv))
    {
        return -1;
    }

    e->rng = EVP_CIPHER_CTX_new();

    if (e->rng == NULL
        || EVP_EncryptInit_ex(e->rng, EVP_chacha20(), NULL, key, iv) != 1)
    {
        return -1;
    }

    OPENSSL_cleanse(key, sizeof(key));

    return 0;
}


static void
sbx_rng_seeds(sbx_engine_t *e, uint64_t seeds[2])
{
    int            n;
    unsigned char  zero[16], out[16];

    memset(zero, 0, sizeof(zero));

    if (EVP_EncryptUpdate(e->rng, out, &n, zero, sizeof(zero)) != 1
        || n != sizeof(out))
    {
        /* cannot happen for a stream cipher; never reuse a seed */
        abort();
    }

    memcpy(seeds, out, sizeof(out));
}


sbx_engine_t *
sbx_engine_create(char *err, size_t errlen)
{
    lua_State     *L;
    sbx_engine_t  *e;

    e = calloc(1, sizeof(sbx_engine_t));
    if (e == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }

    /* libcrypto's one-time setup reads files and wakes futexes */
    if (sbx_caps_init() != 0) {
        snprintf(err, errlen, "libcrypto initialisation failed");
        free(e);
        return NULL;
    }

    errno = 0;

    if (sbx_rng_init(e) != 0) {
        snprintf(err, errlen, "seeding the host PRNG failed: %s",
                 errno ? strerror(errno) : "libcrypto");
        EVP_CIPHER_CTX_free(e->rng);
        free(e);
        return NULL;
    }

    L = lua_newstate(sbx_alloc, e);
    if (L == NULL) {
        snprintf(err, errlen, "lua_newstate() failed");
        free(e);
        return NULL;
    }

    e->L = L;
    *(sbx_engine_t **) lua_getextraspace(L) = e;

    /* the base table of safe globals, kept in the registry */
    sbx_stdlib_open(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "sbx.stdlib");

    /* math.randomseed, for the host to reseed before every call */
    lua_getfield(L, LUA_REGISTRYINDEX, "sbx.stdlib");
    lua_getfield(L, -1, "math");
    lua_getfield(L, -1, "randomseed");
    e->randomseed_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 2);

    lua_gc(L, LUA_GCGEN, 0, 0);

    return e;
}


void
sbx_engine_destroy(sbx_engine_t *e)
{
    if (e == NULL) {
        return;
    }

    if (e->L) {
        lua_close(e->L);
    }

    EVP_CIPHER_CTX_free(e->rng);
    free(e->scripts);
    free(e->out);
    free(e);
}


size_t
sbx_engine_memory(sbx_engine_t *e)
{
    return e->used;
}


/* __index of a call's _ENV: copies library tables on first use */

static int
sbx_env_index(lua_State *L)
{
    /* 1: env, 2: key; upvalue 1: the globals this script may read */

    if (lua_type(L, 2) != LUA_TSTRING) {
        return 0;
    }

    lua_settop(L, 2);
    lua_pushvalue(L, 2);

    switch (lua_rawget(L, lua_upvalueindex(1))) {

    case LUA_TNIL:
        if (strcmp(lua_tostring(L, 2), "_G") != 0) {
            return 1;
        }

        /* "_G" names the call's own environment */
        lua_pop(L, 1);
        lua_pushvalue(L, 1);
        break;

    case LUA_TTABLE:
        /* a library: this call gets its own shallow copy */
        lua_createtable(L, 0, 32);
        lua_pushnil(L);

        while (lua_next(L, 3)) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, 4);
        }

        lua_replace(L, 3);
        break;

    default:
        break;
    }

    /* cache it in this call's environment */
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_rawset(L, 1);

    return 1;
}


/*
 * Builds the metatable of a script's environments: __index reads the
 * script's globals (safe base + its capabilities), __metatable hides it.
 */

static int
sbx_env_metatable(lua_State *L, uint32_t caps)
{
    uint32_t  cap;

    lua_createtable(L, 0, 2);

    lua_createtable(L, 0, 48);
    lua_getfield(L, LUA_REGISTRYINDEX, "sbx.stdlib");
    lua_pushnil(L);

    while (lua_next(L, -2)) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -5);
    }

    lua_pop(L, 1);

    for (cap = 1; cap != 0 && cap <= SBX_CAP_LOG; cap <<= 1) {
        if (caps & cap) {
            if (sbx_caps_open(L, cap) != 0) {
                return -1;
            }

            lua_setfield(L, -2, sbx_cap_name(cap));
        }
    }

    lua_pushcclosure(L, sbx_env_index, 1);
    lua_setfield(L, -2, "__index");

    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");

    return luaL_ref(L, LUA_REGISTRYINDEX);
}


/* error objects are hostile: only strings are reported, bounded */

static void
sbx_error_text(lua_State *L, int idx, char *buf, size_t size)
{
    size_t       len;
    const char  *s;

    if (lua_type(L, idx) == LUA_TSTRING) {
        s = lua_tolstring(L, idx, &len);

        if (len >= size) {
            len = size - 1;
        }

        memcpy(buf, s, len);
        buf[len] = '\0';
        return;
    }

    snprintf(buf, size, "(error object is a %s value)",
             lua_typename(L, lua_type(L, idx)));
}


static void
sbx_call_begin(sbx_engine_t *e, uint64_t memory, uint64_t instructions,
    uint32_t timeout_ms)
{
    lua_State  *L = e->L;

    clock_gettime(CLOCK_MONOTONIC, &e->deadline);
    e->deadline.tv_sec += timeout_ms / 1000;
    e->deadline.tv_nsec += (long) (timeout_ms % 1000) * 1000000;

    if (e->deadline.tv_nsec >= 1000000000) {
        e->deadline.tv_sec++;
        e->deadline.tv_nsec -= 1000000000;
    }

    e->instructions = 0;
    e->max_instructions = instructions;
    e->tripped = SBX_TRIP_NONE;
    e->refused = 0;
    e->nlogs = 0;
    e->log_bytes = 0;
    e->log_dropped = 0;

    e->start_used = e->used;
    e->limit = memory ? e->used + memory : 0;
    e->peak = e->used;

    lua_sethook(L, sbx_hook, LUA_MASKCOUNT, SBX_HOOK_PERIOD);
}


static void
sbx_call_end(sbx_engine_t *e)
{
    lua_sethook(e->L, NULL, 0, 0);
    e->limit = 0;

    /* a refusal nobody asked again for */
    if (e->refused && e->tripped == SBX_TRIP_NONE) {
        e->tripped = SBX_TRIP_MEMORY;
    }

    e->refused = 0;
}


/*
 * lua-cjson mallocs its buffers outside the Lua count and frees them only
 * on its own errors: a memory error or a limit raised while it decodes
 * leaves the buffer behind, once per such call.  After a call that failed,
 * the helper's heap outside Lua is measured (mallinfo2(): no syscall); once
 * it has grown by an eighth of the address-space limit (at least 8 MiB)
 * since the helper was ready, the helper asks to be recycled.
 */

static size_t
sbx_heap_bytes(void)
{
#ifdef SBX_SANITIZE
    /* the sanitizer's allocator serves malloc: glibc's arenas stay empty */
    return __sanitizer_get_current_allocated_bytes();
#else
    struct mallinfo2  mi;

    mi = mallinfo2();

    return mi.uordblks + mi.hblkhd;
#endif
}


static void
sbx_check_native(sbx_engine_t *e)
{
    size_t  heap, native, bound;

    heap = sbx_heap_bytes();
    native = heap > e->used ? heap - e->used : 0;

    bound = e->as ? e->as / 8 : 128 * 1024 * 1024;

    if (bound < 8 * 1024 * 1024) {
        bound = 8 * 1024 * 1024;
    }

    if (native > e->native_base + bound) {
        e->recycle = 1;
    }
}


int
sbx_engine_wants_recycle(sbx_engine_t *e)
{
    return e->recycle;
}


/*
 * The compiled top level is shared by every call of its script: its _ENV
 * upvalue, set to each call's new table, would keep that call's globals
 * (and all they reach) alive after it, out of any call's count — memory
 * one request holds against the next, and garbage whose collection the
 * next request pays for.  Cleared as soon as a call is over.
 */

static void
sbx_forget_env(lua_State *L, sbx_script_slot_t *s)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, s->chunk_ref);
    lua_pushnil(L);

    if (lua_setupvalue(L, -2, 1) == NULL) {
        lua_pop(L, 1);
    }

    lua_pop(L, 1);
}


/*
 * Pushes a new thread with the script's top level on it, its _ENV set to a
 * new table, and runs it.  On success the hooks value is left on the
 * thread's stack.
 */

static int
sbx_run_top(sbx_engine_t *e, sbx_script_slot_t *s, lua_State **pco,
    char *err, size_t errlen)
{
    int         rc;
    lua_State  *L = e->L, *co;

    co = lua_newthread(L);
    *pco = co;

    lua_rawgeti(co, LUA_REGISTRYINDEX, s->chunk_ref);

    lua_createtable(co, 0, 4);
    lua_rawgeti(co, LUA_REGISTRYINDEX, s->mt_ref);
    lua_setmetatable(co, -2);

    if (lua_setupvalue(co, -2, 1) == NULL) {
        lua_pop(co, 1);
    }

    rc = lua_pcall(co, 0, 1, 0);

    if (rc != LUA_OK) {
        sbx_error_text(co, -1, err, errlen);
        return -1;
    }

    return 0;
}


static unsigned
sbx_hooks_of(lua_State *co, int idx)
{
    unsigned  hooks = 0;

    if (lua_type(co, idx) == LUA_TFUNCTION) {
        return SBX_HAS_REQUEST;
    }

    if (lua_type(co, idx) != LUA_TTABLE) {
        return 0;
    }

    /* raw access: a metatable on the returned table runs no code here */
    idx = lua_absindex(co, idx);

    lua_pushliteral(co, "request");
    if (lua_rawget(co, idx) == LUA_TFUNCTION) {
        hooks |= SBX_HAS_REQUEST;
    }

    lua_pushliteral(co, "response");
    if (lua_rawget(co, idx) == LUA_TFUNCTION) {
        hooks |= SBX_HAS_RESPONSE;
    }

    lua_pop(co, 2);

    return hooks;
}


int
sbx_engine_load(sbx_engine_t *e, const sbx_script_t *s, unsigned *hooks,
    char *err, size_t errlen)
{
    int                 rc, top;
    char                name[512], msg[SBX_MAX_ERROR_MSG];
    lua_State          *L = e->L, *co;
    sbx_script_slot_t  *slot, *scripts;

    if (s->source.len > SBX_MAX_SCRIPT_SIZE) {
        snprintf(err, errlen, "%.*s:1: script is larger than %d bytes",
                 (int) s->chunkname.len, s->chunkname.data,
                 SBX_MAX_SCRIPT_SIZE);
        return -1;
    }

    if (e->nscripts >= SBX_MAX_CONNECTORS) {
        snprintf(err, errlen, "too many scripts");
        return -1;
    }

    scripts = realloc(e->scripts, (e->nscripts + 1) * sizeof(*scripts));
    if (scripts == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    e->scripts = scripts;
    slot = &scripts[e->nscripts];
    memset(slot, 0, sizeof(*slot));

    slot->name = strndup((const char *) s->name.data, s->name.len);
    if (slot->name == NULL) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }

    slot->caps = s->caps;
    slot->memory = s->memory;
    slot->instructions = s->instructions;
    slot->timeout_ms = s->timeout_ms;

    top = lua_gettop(L);

    if (s->source.len && s->source.data[0] == LUA_SIGNATURE[0]) {
        snprintf(err, errlen, "%.*s:1: %s", (int) s->chunkname.len,
                 s->chunkname.data, SBX_BINARY_CHUNK);
        return -1;
    }

    snprintf(name, sizeof(name), "@%.*s", (int) s->chunkname.len,
             s->chunkname.data);

    /* compiling is C code no hook interrupts: cap its memory */
    sbx_call_begin(e, s->memory, s->instructions, s->timeout_ms);

    rc = luaL_loadbufferx(L, (const char *) s->source.data, s->source.len,
                          name, "t");

    if (rc != LUA_OK) {
        sbx_error_text(L, -1, msg, sizeof(msg));
        sbx_call_end(e);

        if (e->tripped == SBX_TRIP_MEMORY || rc == LUA_ERRMEM) {
            snprintf(err, errlen, "%.*s:1: memory limit exceeded while "
                     "compiling", (int) s->chunkname.len, s->chunkname.data);
        } else {
            snprintf(err, errlen, "%s", msg);
        }

        lua_settop(L, top);
        return -1;
    }

    sbx_call_end(e);

    slot->chunk_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    slot->mt_ref = sbx_env_metatable(L, s->caps);

    if (slot->mt_ref < 0) {
        snprintf(err, errlen, "cannot set up capabilities");
        lua_settop(L, top);
        return -1;
    }

    /* the top level is user code too: run it once, limits armed */
    sbx_call_begin(e, s->memory, s->instructions, s->timeout_ms);
    rc = sbx_run_top(e, slot, &co, msg, sizeof(msg));
    sbx_call_end(e);
    sbx_forget_env(L, slot);

    if (rc != 0 || e->tripped) {
        if (e->tripped) {
            snprintf(err, errlen, "%.*s:1: top level: %s",
                     (int) s->chunkname.len, s->chunkname.data,
                     sbx_trip_message(e->tripped));
        } else {
            snprintf(err, errlen, "%s", msg);
        }

        lua_settop(L, top);
        return -1;
    }

    slot->hooks = sbx_hooks_of(co, -1);
    lua_settop(L, top);

    if (slot->hooks == 0) {
        snprintf(err, errlen, "%.*s:1: the script must return a function "
                 "or a table with a \"request\" or \"response\" function",
                 (int) s->chunkname.len, s->chunkname.data);
        return -1;
    }

    *hooks = slot->hooks;

    return (int) e->nscripts++;
}


void
sbx_engine_ready(sbx_engine_t *e, uint64_t as)
{
    size_t  heap;

    lua_gc(e->L, LUA_GCCOLLECT);
    e->baseline = e->used;

    heap = sbx_heap_bytes();

    e->as = as;
    e->native_base = heap > e->used ? heap - e->used : 0;
}


void
sbx_engine_idle(sbx_engine_t *e)
{
    /* garbage of earlier calls must not eat into the next call's limit */
    if (e->used > e->baseline + 4 * 1024 * 1024) {
        lua_gc(e->L, LUA_GCCOLLECT);
    }
}


/* ---- building the tables a hook receives ---- */

static int
sbx_hexval(int c)
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


static void
sbx_push_unescaped(lua_State *L, const uint8_t *p, size_t len)
{
    size_t       i;
    int          h, l;
    luaL_Buffer  b;

    luaL_buffinit(L, &b);

    for (i = 0; i < len; i++) {
        if (p[i] == '+') {
            luaL_addchar(&b, ' ');

        } else if (p[i] == '%' && i + 2 < len
                   && (h = sbx_hexval(p[i + 1])) >= 0
                   && (l = sbx_hexval(p[i + 2])) >= 0)
        {
            luaL_addchar(&b, (char) (h * 16 + l));
            i += 2;

        } else {
            luaL_addchar(&b, (char) p[i]);
        }
    }

    luaL_pushresult(&b);
}


/* req.query: repeated keys become arrays, keys without '=' are true */

static void
sbx_push_query(lua_State *L, const uint8_t *p, size_t len)
{
    int             n = 0;
    size_t          klen;
    const uint8_t  *end = p + len, *amp, *eq;

    lua_createtable(L, 0, 4);

    while (p < end && n < 100) {
        amp = memchr(p, '&', end - p);
        if (amp == NULL) {
            amp = end;
        }

        eq = memchr(p, '=', amp - p);
        klen = (eq ? eq : amp) - p;

        if (klen) {
            sbx_push_unescaped(L, p, klen);

            if (eq) {
                sbx_push_unescaped(L, eq + 1, amp - eq - 1);
            } else {
                lua_pushboolean(L, 1);
            }

            lua_pushvalue(L, -2);

            switch (lua_rawget(L, -4)) {
            case LUA_TNIL:
                lua_pop(L, 1);
                lua_rawset(L, -3);
                break;

            case LUA_TTABLE:
                lua_insert(L, -2);
                lua_rawseti(L, -2, (lua_Integer) lua_rawlen(L, -2) + 1);
                lua_pop(L, 2);
                break;

            default:
                lua_createtable(L, 2, 0);
                lua_insert(L, -2);
                lua_rawseti(L, -2, 1);
                lua_insert(L, -2);
                lua_rawseti(L, -2, 2);
                lua_rawset(L, -3);
                break;
            }

            n++;
        }

        p = amp + 1;
    }
}


static int
sbx_push_headers(lua_State *L, sbx_rd_t *rd)
{
    int        t;
    uint32_t   i, n;
    sbx_str_t  name, value;

    if (sbx_get_count(rd, &n, 10000, 8) != 0) {
        return -1;
    }

    lua_createtable(L, 0, (int) n);

    for (i = 0; i < n; i++) {
        if (sbx_get_str(rd, &name) != 0 || sbx_get_str(rd, &value) != 0) {
            return -1;
        }

        lua_pushlstring(L, (const char *) name.data, name.len);
        lua_pushvalue(L, -1);

        t = lua_rawget(L, -3);

        if (name.len == 10 && memcmp(name.data, "set-cookie", 10) == 0
            && t != LUA_TNIL)
        {
            /* Set-Cookie cannot be combined: an array, one per field */
            if (t == LUA_TSTRING) {
                lua_createtable(L, 2, 0);
                lua_insert(L, -2);
                lua_rawseti(L, -2, 1);
            }

            lua_pushlstring(L, (const char *) value.data, value.len);
            lua_rawseti(L, -2, (lua_Integer) lua_rawlen(L, -2) + 1);

        } else if (t == LUA_TSTRING) {
            /* repeated field: combine as RFC 9110 allows */
            if (name.len == 6 && memcmp(name.data, "cookie", 6) == 0) {
                lua_pushliteral(L, "; ");
            } else {
                lua_pushliteral(L, ", ");
            }

            lua_pushlstring(L, (const char *) value.data, value.len);
            lua_concat(L, 3);

        } else {
            lua_pop(L, 1);
            lua_pushlstring(L, (const char *) value.data, value.len);
        }

        lua_rawset(L, -3);
    }

    return 0;
}


static int
sbx_push_body(lua_State *L, sbx_rd_t *rd)
{
    uint8_t    has;
    sbx_str_t  body;

    if (sbx_get_u8(rd, &has) != 0 || sbx_get_str(rd, &body) != 0) {
        return -1;
    }

    if (has) {
        lua_pushlstring(L, (const char *) body.data, body.len);
    } else {
        lua_pushnil(L);
    }

    return 0;
}


static void
sbx_set_str(lua_State *L, const char *key, sbx_str_t *s)
{
    lua_pushlstring(L, (const char *) s->data, s->len);
    lua_setfield(L, -2, key);
}


static void
sbx_set_str_or_nil(lua_State *L, const char *key, sbx_str_t *s)
{
    if (s->len) {
        lua_pushlstring(L, (const char *) s->data, s->len);
        lua_setfield(L, -2, key);
    }
}


static int
sbx_push_request(lua_State *L, sbx_rd_t *rd, const char *connector)
{
    sbx_str_t  method, uri, args, id, ip, country, continent;

    if (sbx_get_str(rd, &method) || sbx_get_str(rd, &uri)
        || sbx_get_str(rd, &args) || sbx_get_str(rd, &id)
        || sbx_get_str(rd, &ip) || sbx_get_str(rd, &country)
        || sbx_get_str(rd, &continent))
    {
        return -1;
    }

    lua_createtable(L, 0, 12);

    sbx_set_str(L, "method", &method);
    sbx_set_str(L, "uri", &uri);
    sbx_set_str(L, "args", &args);
    sbx_set_str(L, "id", &id);

    sbx_push_query(L, args.data, args.len);
    lua_setfield(L, -2, "query");

    lua_pushstring(L, connector);
    lua_setfield(L, -2, "connector");

    lua_createtable(L, 0, 3);
    sbx_set_str(L, "ip", &ip);
    sbx_set_str_or_nil(L, "country", &country);
    sbx_set_str_or_nil(L, "continent", &continent);
    lua_setfield(L, -2, "client");

    if (sbx_push_headers(L, rd) != 0) {
        return -1;
    }

    lua_setfield(L, -2, "headers");

    if (sbx_push_body(L, rd) != 0) {
        return -1;
    }

    lua_setfield(L, -2, "body");

    return 0;
}


static int
sbx_push_response(lua_State *L, sbx_rd_t *rd)
{
    uint32_t  status;

    if (sbx_get_u32(rd, &status) != 0) {
        return -1;
    }

    lua_createtable(L, 0, 3);

    lua_pushinteger(L, status);
    lua_setfield(L, -2, "status");

    if (sbx_push_headers(L, rd) != 0) {
        return -1;
    }

    lua_setfield(L, -2, "headers");

    if (sbx_push_body(L, rd) != 0) {
        return -1;
    }

    lua_setfield(L, -2, "body");

    return 0;
}


/* ---- reading what a hook returned: raw access only, never recurse ---- */

typedef struct {
    sbx_header_t        h[SBX_MAX_HEADERS];
    uint32_t            n;
} sbx_out_headers_t;


static int
sbx_bad(char *err, size_t errlen, const char *fmt, const char *a)
{
    snprintf(err, errlen, fmt, a);
    return -1;
}


static int
sbx_host_owned(const uint8_t *p, size_t len)
{
    static const char  *names[] = {
        "content-length", "transfer-encoding", "connection", "keep-alive",
        "upgrade", "te", "trailer", "proxy-connection", NULL
    };
    const char        **n;

    for (n = names; *n; n++) {
        if (strlen(*n) == len && strncasecmp(*n, (const char *) p, len) == 0)
        {
            return 1;
        }
    }

    return 0;
}


/*
 * A number becomes its decimal text, pushed as a new string (never change
 * a value under lua_next): integers and floats with an integer value
 * exactly (2^53 is "9007199254740992", not "9.007199254741e+15"), other
 * floats as tostring() writes them; NaN and infinities are refused.
 */

static int
sbx_read_header_value(lua_State *L, int idx, sbx_str_t *v)
{
    size_t       len;
    lua_Number   d;
    lua_Integer  i;
    const char  *s;

    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        s = lua_tolstring(L, idx, &len);
        break;

    case LUA_TNUMBER:
        if (lua_isinteger(L, idx)) {
            lua_pushvalue(L, idx);

        } else {
            d = lua_tonumber(L, idx);

            if (d != d || d - d != 0) {
                return -1;
            }

            if (lua_numbertointeger(d, &i) && (lua_Number) i == d) {
                lua_pushinteger(L, i);

            } else {
                lua_pushvalue(L, idx);
            }
        }

        s = lua_tolstring(L, -1, &len);
        break;

    default:
        return -1;
    }

    if (!sbx_header_value_valid((const uint8_t *) s, len)) {
        return -1;
    }

    v->data = (const uint8_t *) s;
    v->len = len;

    return 0;
}


/*
 * The table on the top holds exactly the keys 1..n: nothing of a map or a
 * sparse array may be dropped without a word.
 */

static int
sbx_is_sequence(lua_State *L, lua_Integer n)
{
    lua_Integer  keys = 0;

    if (!lua_checkstack(L, 2)) {
        return -1;
    }

    lua_pushnil(L);

    while (lua_next(L, -2)) {
        lua_pop(L, 1);

        if (++keys > n || !lua_isinteger(L, -1)) {
            lua_pop(L, 1);
            return -1;
        }
    }

    return 0;
}


/*
 * Reads a headers table into out.  Values are strings, numbers, or arrays
 * of those (one field line each).  Strings stay anchored on the stack (the
 * table) until the result is written.
 */

static int
sbx_read_headers(lua_State *L, int idx, sbx_out_headers_t *out, char *err,
    size_t errlen)
{
    int          vt;
    size_t       len;
    lua_Integer  i, n;
    const char  *name;
    sbx_str_t    key, v;

    out->n = 0;

    if (lua_type(L, idx) == LUA_TNIL) {
        return 0;
    }

    if (lua_type(L, idx) != LUA_TTABLE || lua_getmetatable(L, idx)) {
        return sbx_bad(err, errlen, "headers must be a plain table%s", "");
    }

    lua_pushnil(L);

    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            return sbx_bad(err, errlen, "header names must be strings%s", "");
        }

        name = lua_tolstring(L, -2, &len);

        if (!sbx_header_name_valid((const uint8_t *) name, len)) {
            return sbx_bad(err, errlen, "invalid header name%s", "");
        }

        key.data = (const uint8_t *) name;
        key.len = len;
        vt = lua_type(L, -1);

        if (vt == LUA_TTABLE) {
            if (lua_getmetatable(L, -1)) {
                return sbx_bad(err, errlen, "header \"%s\": value must be "
                               "a plain table", name);
            }

            n = (lua_Integer) lua_rawlen(L, -1);

            if (sbx_is_sequence(L, n) != 0) {
                return sbx_bad(err, errlen, "header \"%s\": value must be "
                               "a string, a number or an array of them",
                               name);
            }

            for (i = 1; i <= n; i++) {
                if (out->n >= SBX_MAX_HEADERS) {
                    return sbx_bad(err, errlen, "too many headers%s", "");
                }

                if (!lua_checkstack(L, 4)) {
                    return sbx_bad(err, errlen, "too many headers%s", "");
                }

                lua_rawgeti(L, -1, i);

                if (sbx_read_header_value(L, lua_gettop(L), &v) != 0) {
                    return sbx_bad(err, errlen, "header \"%s\": invalid "
                                   "value", name);
                }

                /* keep the value anchored: move it below the key */
                if (lua_type(L, -1) == LUA_TSTRING
                    && lua_type(L, -2) == LUA_TNUMBER)
                {
                    lua_remove(L, -2);
                }

                /* [key, array, value] -> [value, key, array] */
                lua_insert(L, -3);

                if (!sbx_host_owned(key.data, key.len)) {
                    out->h[out->n].name = key;
                    out->h[out->n].value = v;
                    out->n++;
                }
            }

            lua_pop(L, 1);
            continue;
        }

        if (out->n >= SBX_MAX_HEADERS) {
            return sbx_bad(err, errlen, "too many headers%s", "");
        }

        if (sbx_read_header_value(L, lua_gettop(L), &v) != 0) {
            return sbx_bad(err, errlen, "header \"%s\": invalid value", name);
        }

        if (vt == LUA_TNUMBER) {
            /* the converted copy must outlive the loop: keep it below */
            if (!lua_checkstack(L, 4)) {
                return sbx_bad(err, errlen, "too many headers%s", "");
            }

            lua_insert(L, -3);
        }

        if (!sbx_host_owned(key.data, key.len)) {
            out->h[out->n].name = key;
            out->h[out->n].value = v;
            out->n++;
        }

        lua_pop(L, 1);
    }

    return 0;
}


static int
sbx_read_status(lua_State *L, int idx, uint32_t *status)
{
    lua_Number   d;
    lua_Integer  i;

    if (lua_type(L, idx) != LUA_TNUMBER) {
        return -1;
    }

    if (lua_isinteger(L, idx)) {
        i = lua_tointeger(L, idx);

    } else {
        d = lua_tonumber(L, idx);

        if (!(d >= 200 && d <= 599) || floor(d) != d) {
            return -1;
        }

        i = (lua_Integer) d;
    }

    /* a final answer: a 1xx would leave the client waiting for one */
    if (i < 200 || i > 599) {
        return -1;
    }

    *status = (uint32_t) i;

    return 0;
}


static int
sbx_read_string_field(lua_State *L, int t, const char *key, sbx_str_t *s,
    int *present)
{
    size_t       len;
    const char  *p;

    lua_pushstring(L, key);

    switch (lua_rawget(L, t)) {
    case LUA_TNIL:
        *present = 0;
        return 0;

    case LUA_TSTRING:
        p = lua_tolstring(L, -1, &len);
        s->data = (const uint8_t *) p;
        s->len = len;
        *present = 1;
        return 0;

    default:
        return -1;
    }
}


static int
sbx_uri_valid(const sbx_str_t *s, int is_uri)
{
    size_t  i;

    if (s->len > 8192 || (is_uri && (s->len == 0 || s->data[0] != '/'))) {
        return 0;
    }

    for (i = 0; i < s->len; i++) {
        /* req.uri is decoded (nginx escapes it again); args are not */
        if (s->data[i] < 0x20 || s->data[i] == 0x7f
            || (!is_uri && (s->data[i] == ' ' || s->data[i] == '#')))
        {
            return 0;
        }
    }

    return 1;
}


static int
sbx_out_reserve(sbx_engine_t *e, size_t size)
{
    uint8_t  *p;

    if (size <= e->out_size) {
        return 0;
    }

    p = realloc(e->out, size);
    if (p == NULL) {
        return -1;
    }

    e->out = p;
    e->out_size = size;

    return 0;
}


static void
sbx_write_common(sbx_engine_t *e, sbx_wr_t *w, unsigned outcome,
    uint64_t time_us, uint32_t cpu_ms)
{
    uint32_t  i;

    sbx_put_u8(w, (uint8_t) outcome);
    sbx_put_u64(w, e->instructions);
    sbx_put_u64(w, e->peak - e->start_used);
    sbx_put_u32(w, (uint32_t) time_us);
    sbx_put_u32(w, cpu_ms);
    sbx_put_u32(w, e->nlogs + (e->log_dropped ? 1 : 0));

    for (i = 0; i < e->nlogs; i++) {
        sbx_put_u8(w, e->logs[i].level);
        sbx_put_str(w, e->log_buf + e->logs[i].off, e->logs[i].len);
    }

    if (e->log_dropped) {
        sbx_put_u8(w, SBX_LOG_WARN);
        sbx_put_str(w, "further log lines of this request were dropped",
                    sizeof("further log lines of this request were dropped")
                    - 1);
    }
}


typedef struct {
    sbx_script_slot_t  *slot;
    unsigned            hook;
    sbx_rd_t            rd;
    const char         *connector;
    int                 nohook;
    int                 malformed;
} sbx_invoke_t;


/*
 * Runs in protected mode on the call's thread: the top level, then the
 * hook with the tables built from the CALL payload.
 */

static int
sbx_invoke(lua_State *L)
{
    int            nargs;
    sbx_invoke_t  *ctx = lua_touserdata(L, 1);

    lua_settop(L, 0);

    lua_rawgeti(L, LUA_REGISTRYINDEX, ctx->slot->chunk_ref);
    lua_createtable(L, 0, 4);
    lua_rawgeti(L, LUA_REGISTRYINDEX, ctx->slot->mt_ref);
    lua_setmetatable(L, -2);

    if (lua_setupvalue(L, -2, 1) == NULL) {
        lua_pop(L, 1);
    }

    lua_call(L, 0, 1);

    /* 1: what the top level returned */

    if (lua_type(L, 1) == LUA_TTABLE) {
        lua_pushstring(L, ctx->hook == SBX_HOOK_RESPONSE ? "response"
                                                          : "request");
        lua_rawget(L, 1);

    } else if (lua_type(L, 1) == LUA_TFUNCTION
               && ctx->hook == SBX_HOOK_REQUEST)
    {
        lua_pushvalue(L, 1);

    } else {
        lua_pushnil(L);
    }

    if (lua_type(L, 2) != LUA_TFUNCTION) {
        ctx->nohook = 1;
        return 0;
    }

    /* 2: the hook */

    if (ctx->hook == SBX_HOOK_RESPONSE) {
        if (sbx_push_request(L, &ctx->rd, ctx->connector) != 0
            || sbx_push_response(L, &ctx->rd) != 0)
        {
            ctx->malformed = 1;
            return luaL_error(L, "malformed call");
        }

        /* response(res, req) */
        lua_insert(L, 3);
        nargs = 2;

    } else {
        if (sbx_push_request(L, &ctx->rd, ctx->connector) != 0) {
            ctx->malformed = 1;
            return luaL_error(L, "malformed call");
        }

        nargs = 1;
    }

    lua_call(L, nargs, 1);

    return 1;
}


static uint64_t
sbx_elapsed_us(const struct timespec *t0)
{
    struct timespec  t1;

    clock_gettime(CLOCK_MONOTONIC, &t1);

    return (uint64_t) (t1.tv_sec - t0->tv_sec) * 1000000
           + (t1.tv_nsec - t0->tv_nsec) / 1000;
}


/*
 * The helper's CPU time so far, for the worker's recycling budget.  The
 * CPU-time clock is a real system call (no vDSO path), so it is read again
 * only every 64 calls or after a call that took a millisecond or more.
 */

static uint32_t
sbx_cpu_ms(uint64_t call_us)
{
    struct timespec   t;
    static unsigned   n;
    static uint32_t   ms;

    if (n++ % 64 != 0 && call_us < 1000) {
        return ms;
    }

    if (clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t) == 0) {
        ms = (uint32_t) (t.tv_sec * 1000 + t.tv_nsec / 1000000);
    }

    return ms;
}


/* what the hook returned, checked; writes the outcome-specific part */

static unsigned
sbx_read_result(lua_State *co, unsigned hook, sbx_wr_t *w, int write,
    sbx_out_headers_t *hdrs, char *err, size_t errlen)
{
    int        t, present;
    uint32_t   i, status;
    sbx_str_t  uri, args, body;

    t = lua_gettop(co);

    if (lua_type(co, t) != LUA_TTABLE) {
        snprintf(err, errlen, "the %s hook returned a %s value, not a table",
                 hook == SBX_HOOK_RESPONSE ? "response" : "request",
                 lua_typename(co, lua_type(co, t)));
        return SBX_OUT_BAD_RETURN;
    }

    if (lua_getmetatable(co, t)) {
        lua_pop(co, 1);
        snprintf(err, errlen, "the returned table has a metatable");
        return SBX_OUT_BAD_RETURN;
    }

    lua_pushliteral(co, "status");
    lua_rawget(co, t);

    if (lua_type(co, -1) != LUA_TNIL || hook == SBX_HOOK_RESPONSE) {

        /* a response: status, headers, body */

        if (sbx_read_status(co, -1, &status) != 0) {
            snprintf(err, errlen, "status must be an integer from 200 to "
                     "599");
            return SBX_OUT_BAD_RETURN;
        }

        lua_pushliteral(co, "headers");
        lua_rawget(co, t);

        if (sbx_read_headers(co, lua_gettop(co), hdrs, err, errlen) != 0) {
            return SBX_OUT_BAD_RETURN;
        }

        if (sbx_read_string_field(co, t, "body", &body, &present) != 0) {
            snprintf(err, errlen, "body must be a string or nil");
            return SBX_OUT_BAD_RETURN;
        }

        if (write) {
            sbx_put_u32(w, status);
            sbx_put_u32(w, hdrs->n);

            for (i = 0; i < hdrs->n; i++) {
                sbx_put_str(w, hdrs->h[i].name.data, hdrs->h[i].name.len);
                sbx_put_str(w, hdrs->h[i].value.data, hdrs->h[i].value.len);
            }

            sbx_put_u8(w, (uint8_t) present);
            sbx_put_str(w, present ? body.data : NULL, present ? body.len : 0);
        }

        return SBX_OUT_RESPONSE;
    }

    /* the request, to go upstream: uri, args, headers, body */

    if (sbx_read_string_field(co, t, "uri", &uri, &present) != 0
        || !present || !sbx_uri_valid(&uri, 1))
    {
        snprintf(err, errlen, "uri must be a string starting with \"/\" "
                 "without control characters");
        return SBX_OUT_BAD_RETURN;
    }

    if (sbx_read_string_field(co, t, "args", &args, &present) != 0
        || (present && !sbx_uri_valid(&args, 0)))
    {
        snprintf(err, errlen, "args must be a string without control "
                 "characters, spaces or \"#\"");
        return SBX_OUT_BAD_RETURN;
    }

    if (!present) {
        args.data = NULL;
        args.len = 0;
    }

    lua_pushliteral(co, "headers");
    lua_rawget(co, t);

    if (sbx_read_headers(co, lua_gettop(co), hdrs, err, errlen) != 0) {
        return SBX_OUT_BAD_RETURN;
    }

    if (sbx_read_string_field(co, t, "body", &body, &present) != 0) {
        snprintf(err, errlen, "body must be a string or nil");
        return SBX_OUT_BAD_RETURN;
    }

    if (write) {
        sbx_put_str(w, uri.data, uri.len);
        sbx_put_str(w, args.data, args.len);
        sbx_put_u32(w, hdrs->n);

        for (i = 0; i < hdrs->n; i++) {
            sbx_put_str(w, hdrs->h[i].name.data, hdrs->h[i].name.len);
            sbx_put_str(w, hdrs->h[i].value.data, hdrs->h[i].value.len);
        }

        sbx_put_u8(w, (uint8_t) present);
        sbx_put_str(w, present ? body.data : NULL, present ? body.len : 0);
    }

    return SBX_OUT_REQUEST;
}


int
sbx_engine_call(sbx_engine_t *e, unsigned script, unsigned hook,
    const uint8_t *payload, size_t len, uint8_t **out, size_t *outlen)
{
    int                 rc, top, base;
    char                msg[SBX_MAX_ERROR_MSG];
    unsigned            outcome;
    uint32_t            cpu;
    uint64_t            us, seeds[2];
    sbx_wr_t            w;
    lua_State          *L = e->L, *co;
    sbx_invoke_t        ctx;
    struct timespec     t0;
    sbx_script_slot_t  *slot;
    sbx_out_headers_t  *hdrs;
    static sbx_out_headers_t  headers;

    if (script >= e->nscripts) {
        return -1;
    }

    slot = &e->scripts[script];
    hdrs = &headers;
    msg[0] = '\0';

    clock_gettime(CLOCK_MONOTONIC, &t0);

    top = lua_gettop(L);

    /* no PRNG state crosses calls */
    sbx_rng_seeds(e, seeds);
    lua_rawgeti(L, LUA_REGISTRYINDEX, e->randomseed_ref);
    lua_pushinteger(L, (lua_Integer) seeds[0]);
    lua_pushinteger(L, (lua_Integer) seeds[1]);
    lua_pcall(L, 2, 0, 0);
    lua_settop(L, top);

    ctx.slot = slot;
    ctx.hook = hook;
    ctx.connector = slot->name;
    ctx.nohook = 0;
    ctx.malformed = 0;
    sbx_rd_init(&ctx.rd, payload, len);

    /* a new thread copies the hook of its creator: arm the limits first */
    sbx_call_begin(e, slot->memory, slot->instructions, slot->timeout_ms);

    co = lua_newthread(L);

    lua_pushcfunction(co, sbx_invoke);
    lua_pushlightuserdata(co, &ctx);
    rc = lua_pcall(co, 1, 1, 0);

    sbx_call_end(e);
    sbx_forget_env(L, slot);

    if (rc != LUA_OK || e->tripped) {
        sbx_check_native(e);
    }

    if (ctx.malformed) {
        lua_settop(L, top);
        return -1;
    }

    base = lua_gettop(co);

    if (e->tripped == SBX_TRIP_INSTRUCTIONS) {
        outcome = SBX_OUT_INSTRUCTIONS;

    } else if (e->tripped == SBX_TRIP_MEMORY || rc == LUA_ERRMEM) {
        outcome = SBX_OUT_MEMORY;

    } else if (e->tripped == SBX_TRIP_TIMEOUT) {
        outcome = SBX_OUT_TIMEOUT;

    } else if (rc != LUA_OK) {
        outcome = SBX_OUT_SCRIPT_ERROR;
        sbx_error_text(co, -1, msg, sizeof(msg));

    } else if (ctx.nohook) {
        outcome = SBX_OUT_NOHOOK;

    } else {
        outcome = sbx_read_result(co, hook, NULL, 0, hdrs, msg, sizeof(msg));
    }

    if (outcome >= SBX_OUT_INSTRUCTIONS && msg[0] == '\0') {
        snprintf(msg, sizeof(msg), "%s", sbx_trip_message(e->tripped
                 ? e->tripped : SBX_TRIP_MEMORY));
    }

    us = sbx_elapsed_us(&t0);
    cpu = sbx_cpu_ms(us);

    /* measure, then write */
    for ( ;; ) {
        sbx_wr_init(&w, e->out ? e->out + SBX_FRAME_HDR_SIZE : NULL,
                    e->out_size > SBX_FRAME_HDR_SIZE
                    ? e->out_size - SBX_FRAME_HDR_SIZE : 0);

        sbx_write_common(e, &w, outcome, us, cpu);

        if (outcome == SBX_OUT_RESPONSE || outcome == SBX_OUT_REQUEST) {
            lua_settop(co, base);
            (void) sbx_read_result(co, hook, &w, 1, hdrs, msg, sizeof(msg));

        } else if (outcome != SBX_OUT_NOHOOK) {
            sbx_put_str(&w, msg, strlen(msg));
        }

        if (e->out && !w.overflow
            && w.need + SBX_FRAME_HDR_SIZE <= e->out_size)
        {
            break;
        }

        if (w.need > SBX_FRAME_MAX
            || sbx_out_reserve(e, w.need + SBX_FRAME_HDR_SIZE) != 0)
        {
            lua_settop(L, top);
            return -1;
        }
    }

    *out = e->out;
    *outlen = w.need;

    lua_settop(L, top);

    return 0;
}


/* ---- configuration-time checks (sbx-lua-helper check) ---- */

typedef struct {
    int                 set;
    int                 line;
    char               *name;
    char               *field;
} sbx_access_t;


typedef struct {
    sbx_access_t       *a;
    size_t              n;
    size_t              size;
    int                 oom;
} sbx_accesses_t;


static void
sbx_collect(void *data, int set, const char *name, size_t len,
    const char *field, size_t flen, int line)
{
    sbx_access_t    *a;
    sbx_accesses_t  *acc = data;

    if (acc->oom) {
        return;
    }

    if (acc->n == acc->size) {
        a = realloc(acc->a, (acc->size * 2 + 16) * sizeof(sbx_access_t));
        if (a == NULL) {
            acc->oom = 1;
            return;
        }

        acc->a = a;
        acc->size = acc->size * 2 + 16;
    }

    a = &acc->a[acc->n++];
    a->set = set;
    a->line = line;
    a->name = strndup(name, len);
    a->field = field ? strndup(field, flen) : NULL;
}


/*
 * The buffer is set up on the first write, as lstrlib's str_dump does:
 * lua_dump reads the function once, and luaL_Buffer keeps its box on the
 * top of the stack from then on.
 */

typedef struct {
    int                 init;
    luaL_Buffer         b;
} sbx_dump_buf_t;


static int
sbx_dump_writer(lua_State *L, const void *p, size_t sz, void *ud)
{
    sbx_dump_buf_t  *d = ud;

    if (!d->init) {
        d->init = 1;
        luaL_buffinit(L, &d->b);
    }

    luaL_addlstring(&d->b, p, sz);

    return 0;
}


static int
sbx_dump_chunk(lua_State *L)
{
    sbx_dump_buf_t  d;

    /* 1: the compiled chunk, on the top */
    lua_settop(L, 1);
    d.init = 0;

    lua_dump(L, sbx_dump_writer, &d, 0);

    if (!d.init) {
        lua_pushliteral(L, "");
        return 1;
    }

    luaL_pushresult(&d.b);

    return 1;
}


/* 1: readable, 0: not, 2: needs a capability the script was not given */

static int
sbx_global_readable(sbx_engine_t *e, uint32_t caps, const char *name,
    const char *field)
{
    int         rc, t;
    uint32_t    cap;
    lua_State  *L = e->L;
    const char *cname;

    if (strcmp(name, "_G") == 0) {
        return 1;
    }

    lua_getfield(L, LUA_REGISTRYINDEX, "sbx.stdlib");
    t = lua_getfield(L, -1, name);

    if (t == LUA_TNIL) {
        lua_pop(L, 2);

        for (cap = 1; cap <= SBX_CAP_LOG; cap <<= 1) {
            cname = sbx_cap_name(cap);

            if (cname && strcmp(cname, name) == 0) {
                if (!(caps & cap)) {
                    return 2;
                }

                if (field == NULL) {
                    return 1;
                }

                if (sbx_caps_open(L, cap) != 0) {
                    return 0;
                }

                rc = lua_getfield(L, -1, field) != LUA_TNIL;
                lua_pop(L, 2);

                return rc;
            }
        }

        return 0;
    }

    rc = 1;

    if (field && t == LUA_TTABLE) {
        rc = lua_getfield(L, -1, field) != LUA_TNIL;
        lua_pop(L, 1);
    }

    lua_pop(L, 2);

    return rc;
}


#define SBX_CHECK_MAX_PROBLEMS  20


static int
sbx_name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *) a, *(char *const *) b);
}


/* heapsort: glibc's qsort may call sysinfo(), which seccomp kills */

static void
sbx_sift_down(char **a, size_t root, size_t n)
{
    char    *t;
    size_t   child;

    while ((child = 2 * root + 1) < n) {
        if (child + 1 < n && strcmp(a[child], a[child + 1]) < 0) {
            child++;
        }

        if (strcmp(a[root], a[child]) >= 0) {
            return;
        }

        t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}


static void
sbx_sort_names(char **a, size_t n)
{
    char    *t;
    size_t   i;

    for (i = n / 2; i > 0; i--) {
        sbx_sift_down(a, i - 1, n);
    }

    for (i = n; i > 1; i--) {
        t = a[0];
        a[0] = a[i - 1];
        a[i - 1] = t;
        sbx_sift_down(a, 0, i - 1);
    }
}


static int
sbx_same_access(const sbx_access_t *a, const sbx_access_t *b, int field)
{
    if (a->line != b->line || strcmp(a->name, b->name) != 0) {
        return 0;
    }

    if (!field) {
        return 1;
    }

    if (a->field == NULL || b->field == NULL) {
        return a->field == b->field;
    }

    return strcmp(a->field, b->field) == 0;
}


int
sbx_engine_check(sbx_engine_t *e, const sbx_script_t *s, char *out,
    size_t outlen)
{
    int              rc, problems = 0, k;
    char           **sets = NULL;
    size_t           i, j, dlen, used = 0, nsets, nreported;
    size_t           reported[SBX_CHECK_MAX_PROBLEMS];
    char             name[512], msg[SBX_MAX_ERROR_MSG];
    lua_State       *L = e->L;
    const char      *dump;
    sbx_accesses_t   acc;

    out[0] = '\0';

    if (s->source.len > SBX_MAX_SCRIPT_SIZE) {
        snprintf(out, outlen, "%.*s:1: script is larger than %d bytes\n",
                 (int) s->chunkname.len, s->chunkname.data,
                 SBX_MAX_SCRIPT_SIZE);
        return 1;
    }

    if (s->source.len && s->source.data[0] == LUA_SIGNATURE[0]) {
        snprintf(out, outlen, "%.*s:1: %s\n", (int) s->chunkname.len,
                 s->chunkname.data, SBX_BINARY_CHUNK);
        return 1;
    }

    snprintf(name, sizeof(name), "@%.*s", (int) s->chunkname.len,
             s->chunkname.data);

    sbx_call_begin(e, s->memory, s->instructions, s->timeout_ms);
    rc = luaL_loadbufferx(L, (const char *) s->source.data, s->source.len,
                          name, "t");
    sbx_call_end(e);

    if (rc != LUA_OK) {
        if (e->tripped == SBX_TRIP_MEMORY || rc == LUA_ERRMEM) {
            snprintf(out, outlen, "%.*s:1: memory limit exceeded while "
                     "compiling\n", (int) s->chunkname.len,
                     s->chunkname.data);
        } else {
            sbx_error_text(L, -1, msg, sizeof(msg));
            snprintf(out, outlen, "%s\n", msg);
        }

        lua_pop(L, 1);
        return 1;
    }

    lua_pushcfunction(L, sbx_dump_chunk);
    lua_insert(L, -2);

    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        snprintf(out, outlen, "%.*s:1: cannot inspect the compiled script\n",
                 (int) s->chunkname.len, s->chunkname.data);
        lua_pop(L, 1);
        return 1;
    }

    dump = lua_tolstring(L, -1, &dlen);

    memset(&acc, 0, sizeof(acc));

    if (sbx_check_dump((const uint8_t *) dump, dlen, sbx_collect, &acc) != 0
        || acc.oom)
    {
        snprintf(out, outlen, "%.*s:1: cannot inspect the compiled script\n",
                 (int) s->chunkname.len, s->chunkname.data);
        problems++;
        used = strlen(out);
    }

    lua_pop(L, 1);

    /* the names the script assigns, sorted: a big script is not O(n^2) */
    sets = malloc((acc.n ? acc.n : 1) * sizeof(char *));
    nsets = 0;

    if (sets == NULL) {
        snprintf(out, outlen, "%.*s:1: out of memory\n",
                 (int) s->chunkname.len, s->chunkname.data);
        problems = SBX_CHECK_MAX_PROBLEMS;
        used = strlen(out);
    }

    for (i = 0; sets && i < acc.n; i++) {
        if (acc.a[i].set && acc.a[i].name) {
            sets[nsets++] = acc.a[i].name;
        }
    }

    sbx_sort_names(sets, nsets);

    nreported = 0;

    for (i = 0; i < acc.n && problems < SBX_CHECK_MAX_PROBLEMS; i++) {
        if (acc.a[i].set || acc.a[i].name == NULL) {
            continue;
        }

        if (bsearch(&acc.a[i].name, sets, nsets, sizeof(char *),
                    sbx_name_cmp))
        {
            continue;   /* assigned somewhere in the script */
        }

        k = sbx_global_readable(e, s->caps, acc.a[i].name, acc.a[i].field);

        if (k == 1) {
            continue;
        }

        /* the same read twice on one line is reported once */
        for (j = 0; j < nreported; j++) {
            if (sbx_same_access(&acc.a[reported[j]], &acc.a[i], k != 2)) {
                break;
            }
        }

        if (j < nreported) {
            continue;
        }

        reported[nreported++] = i;

        if (k == 2) {
            rc = snprintf(out + used, outlen - used, "%.*s:%d: global \"%s\" "
                          "needs the \"%s\" capability\n",
                          (int) s->chunkname.len, s->chunkname.data,
                          acc.a[i].line, acc.a[i].name, acc.a[i].name);

        } else if (acc.a[i].field
                   && sbx_global_readable(e, s->caps, acc.a[i].name, NULL))
        {
            rc = snprintf(out + used, outlen - used, "%.*s:%d: \"%s.%s\" is "
                          "not available in the sandbox\n",
                          (int) s->chunkname.len, s->chunkname.data,
                          acc.a[i].line, acc.a[i].name, acc.a[i].field);

        } else {
            rc = snprintf(out + used, outlen - used, "%.*s:%d: global \"%s\" "
                          "is not available in the sandbox and is never "
                          "assigned\n", (int) s->chunkname.len,
                          s->chunkname.data, acc.a[i].line, acc.a[i].name);
        }

        if (rc > 0 && (size_t) rc < outlen - used) {
            used += rc;
        }

        problems++;
    }

    for (i = 0; i < acc.n; i++) {
        free(acc.a[i].name);
        free(acc.a[i].field);
    }

    free(acc.a);
    free(sets);

    return problems;
}
