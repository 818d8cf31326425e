/*
 * sbx_stdlib.c: the restricted standard library, built from nothing.
 *
 * Every global a script can read is listed in sbx_globals[] and in the
 * per-library tables below; nothing else is reachable.  luaL_openlibs and
 * the package library are never used.  Each choice is explained in
 * docs/security.md (and SANDBOX-NOTES.md gives the measurements):
 *
 *   - no load, loadfile, dofile, require, collectgarbage, warn;
 *   - print is a bounded logger (lines go to the worker, not to fd 1);
 *   - pcall/xpcall re-raise a tripped limit; xpcall skips its handler once
 *     a limit tripped (handlers of hook errors run with hooks off);
 *   - setmetatable refuses a metatable with a __gc field;
 *   - string.dump is removed from the real string table, string.rep is
 *     capped there too (methods on strings reach the real table), and the
 *     string metatable is protected;
 *   - table.move ranges are capped;
 *   - coroutine: no close; wrap never resets a thread; every new thread is
 *     charged a hook period (hook counters restart per thread);
 *   - os: time, date, clock, difftime only.
 */

#include <string.h>

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "sbx_lib.h"


static int
sbx_finish_pcall(lua_State *L, int status, lua_KContext extra)
{
    sbx_check_tripped(L);

    if (status != LUA_OK && status != LUA_YIELD) {
        lua_pushboolean(L, 0);
        lua_pushvalue(L, -2);
        return 2;
    }

    return lua_gettop(L) - (int) extra;
}


static int
sbx_pcall(lua_State *L)
{
    int  status;

    luaL_checkany(L, 1);
    lua_pushboolean(L, 1);
    lua_insert(L, 1);

    status = lua_pcallk(L, lua_gettop(L) - 2, LUA_MULTRET, 0, 0,
                        sbx_finish_pcall);

    return sbx_finish_pcall(L, status, 0);
}


static int
sbx_xpcall_handler(lua_State *L)
{
    /* a handler entered for a limit error would run with hooks off */
    if (sbx_tripped(L)) {
        lua_settop(L, 1);
        return 1;
    }

    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);

    return 1;
}


static int
sbx_xpcall(lua_State *L)
{
    int  status, n;

    n = lua_gettop(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);

    lua_pushvalue(L, 2);
    lua_pushcclosure(L, sbx_xpcall_handler, 1);
    lua_replace(L, 2);

    lua_pushboolean(L, 1);
    lua_pushvalue(L, 1);
    lua_rotate(L, 3, 2);

    status = lua_pcallk(L, n - 2, LUA_MULTRET, 2, 2, sbx_finish_pcall);

    return sbx_finish_pcall(L, status, 2);
}


static int
sbx_setmetatable(lua_State *L)
{
    int  t;

    t = lua_type(L, 2);

    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_argexpected(L, t == LUA_TNIL || t == LUA_TTABLE, 2, "nil or table");

    if (t == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");

        if (lua_rawget(L, 2) != LUA_TNIL) {
            return luaL_error(L, "setmetatable: __gc metamethods are not "
                              "allowed");
        }

        lua_pop(L, 1);
    }

    if (luaL_getmetafield(L, 1, "__metatable") != LUA_TNIL) {
        return luaL_error(L, "cannot change a protected metatable");
    }

    lua_settop(L, 2);
    lua_setmetatable(L, 1);

    return 1;
}


static int
sbx_print(lua_State *L)
{
    return sbx_log_args(L, SBX_LOG_INFO, "print");
}


static int
sbx_string_rep(lua_State *L)
{
    size_t       l, lsep;
    lua_Integer  n;

    (void) luaL_checklstring(L, 1, &l);
    n = luaL_checkinteger(L, 2);
    (void) luaL_optlstring(L, 3, "", &lsep);

    if (n > 0 && l + lsep == 0) {
        /* "" repeated 2^62 times loops in C without allocating */
        lua_pushliteral(L, "");
        return 1;
    }

    if (n > 0 && (lua_Unsigned) n > SBX_REP_MAX / (l + lsep)) {
        return luaL_error(L, "string.rep: result would be larger than %d "
                          "bytes", SBX_REP_MAX);
    }

    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, 1);

    return 1;
}


static int
sbx_table_move(lua_State *L)
{
    lua_Integer  f, e;

    f = luaL_checkinteger(L, 2);
    e = luaL_checkinteger(L, 3);

    if (e >= f && (lua_Unsigned) e - (lua_Unsigned) f >= SBX_MOVE_MAX) {
        return luaL_error(L, "table.move: range larger than %d elements",
                          SBX_MOVE_MAX);
    }

    sbx_charge(L, (uint64_t) (e >= f ? e - f : 0));

    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);

    return lua_gettop(L);
}


/* coroutines */

static int
sbx_co_create(lua_State *L)
{
    lua_State  *co;

    luaL_checktype(L, 1, LUA_TFUNCTION);

    /* hook counters restart for a new thread: charge a period upfront */
    sbx_charge(L, SBX_HOOK_PERIOD);

    co = lua_newthread(L);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);

    return 1;
}


static int
sbx_auxresume(lua_State *L, lua_State *co, int narg)
{
    int  status, nres;

    if (!lua_checkstack(co, narg)) {
        lua_pushliteral(L, "too many arguments to resume");
        return -1;
    }

    lua_xmove(L, co, narg);
    status = lua_resume(co, L, narg, &nres);

    sbx_check_tripped(L);

    if (status == LUA_OK || status == LUA_YIELD) {
        if (!lua_checkstack(L, nres + 1)) {
            lua_pop(co, nres);
            lua_pushliteral(L, "too many results to resume");
            return -1;
        }

        lua_xmove(co, L, nres);
        return nres;
    }

    lua_xmove(co, L, 1);
    return -1;
}


static int
sbx_co_resume(lua_State *L)
{
    int         r;
    lua_State  *co;

    co = lua_tothread(L, 1);
    luaL_argexpected(L, co, 1, "coroutine");

    r = sbx_auxresume(L, co, lua_gettop(L) - 1);

    if (r < 0) {
        lua_pushboolean(L, 0);
        lua_insert(L, -2);
        return 2;
    }

    lua_pushboolean(L, 1);
    lua_insert(L, -(r + 1));

    return r + 1;
}


static int
sbx_co_auxwrap(lua_State *L)
{
    int         r;
    lua_State  *co;

    co = lua_tothread(L, lua_upvalueindex(1));
    r = sbx_auxresume(L, co, lua_gettop(L));

    if (r < 0) {
        /* unlike the stock wrap, never lua_resetthread: __close handlers
         * would run with hooks off */
        if (lua_type(L, -1) == LUA_TSTRING) {
            luaL_where(L, 1);
            lua_insert(L, -2);
            lua_concat(L, 2);
        }

        return lua_error(L);
    }

    return r;
}


static int
sbx_co_wrap(lua_State *L)
{
    sbx_co_create(L);
    lua_pushcclosure(L, sbx_co_auxwrap, 1);

    return 1;
}


static void
sbx_copy_fields(lua_State *L, int from, const char *const *names)
{
    for ( /* void */ ; *names; names++) {
        lua_getfield(L, from, *names);
        lua_setfield(L, -2, *names);
    }
}


static const char *const  sbx_base_names[] = {
    "assert", "error", "getmetatable", "ipairs", "next", "pairs", "rawequal",
    "rawget", "rawlen", "rawset", "select", "tonumber", "tostring", "type",
    "_VERSION", NULL
};

static const char *const  sbx_os_names[] = {
    "time", "date", "clock", "difftime", NULL
};

static const char *const  sbx_co_names[] = {
    "isyieldable", "running", "status", "yield", NULL
};


static const luaL_Reg  sbx_base_funcs[] = {
    { "pcall", sbx_pcall },
    { "xpcall", sbx_xpcall },
    { "setmetatable", sbx_setmetatable },
    { "print", sbx_print },
    { NULL, NULL }
};


/* pushes the table of safe globals */

void
sbx_stdlib_open(lua_State *L)
{
    int  g;

    lua_createtable(L, 0, 32);
    g = lua_gettop(L);

    /*
     * base: only the safe functions of the stock library (luaopen_base
     * pushes the global table it filled; copy from it into g)
     */
    luaopen_base(L);
    lua_pushvalue(L, g);
    sbx_copy_fields(L, -2, sbx_base_names);
    lua_pop(L, 2);

    /*
     * luaopen_base filled the registry's global table, which no script
     * ever sees; empty it anyway so nothing there is reachable by mistake.
     */
    lua_pushglobaltable(L);
    lua_pushnil(L);

    while (lua_next(L, -2)) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, -4);
    }

    lua_pop(L, 1);

    luaL_setfuncs(L, sbx_base_funcs, 0);

    /* string: the real table, fixed in place */
    luaopen_string(L);

    lua_pushnil(L);
    lua_setfield(L, -2, "dump");

    lua_getfield(L, -1, "rep");
    lua_pushcclosure(L, sbx_string_rep, 1);
    lua_setfield(L, -2, "rep");

    lua_pushliteral(L, "");
    if (lua_getmetatable(L, -1)) {
        lua_pushboolean(L, 0);
        lua_setfield(L, -2, "__metatable");
        lua_pop(L, 1);
    }
    lua_pop(L, 1);

    lua_setfield(L, g, "string");

    /* table */
    luaopen_table(L);
    lua_getfield(L, -1, "move");
    lua_pushcclosure(L, sbx_table_move, 1);
    lua_setfield(L, -2, "move");
    lua_setfield(L, g, "table");

    /* math, utf8 */
    luaopen_math(L);
    lua_setfield(L, g, "math");

    luaopen_utf8(L);
    lua_setfield(L, g, "utf8");

    /* coroutine */
    luaopen_coroutine(L);
    lua_createtable(L, 0, 8);
    sbx_copy_fields(L, -2, sbx_co_names);
    lua_pushcfunction(L, sbx_co_create);
    lua_setfield(L, -2, "create");
    lua_pushcfunction(L, sbx_co_resume);
    lua_setfield(L, -2, "resume");
    lua_pushcfunction(L, sbx_co_wrap);
    lua_setfield(L, -2, "wrap");
    lua_setfield(L, g, "coroutine");
    lua_pop(L, 1);

    /* os: clocks and dates only */
    luaopen_os(L);
    lua_createtable(L, 0, 4);
    sbx_copy_fields(L, -2, sbx_os_names);
    lua_setfield(L, g, "os");
    lua_pop(L, 1);
}
