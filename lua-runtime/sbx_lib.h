/*
 * sbx_lib.h: internal interfaces between the engine, the restricted
 * standard library and the capability modules.
 */

#ifndef SBX_LIB_H
#define SBX_LIB_H

#include <lua.h>
#include <lauxlib.h>

#include "sbx_engine.h"


/* period of the instruction-count hook */
#define SBX_HOOK_PERIOD       1000

/* biggest string string.rep may build, biggest table.move range */
#define SBX_REP_MAX           (16 * 1024 * 1024)
#define SBX_MOVE_MAX          (1 << 24)

/* why a call stopped early: e->tripped */
#define SBX_TRIP_NONE         0
#define SBX_TRIP_INSTRUCTIONS 1
#define SBX_TRIP_MEMORY       2
#define SBX_TRIP_TIMEOUT      3


/* pushes the base table of safe globals (no capabilities) */
void sbx_stdlib_open(lua_State *L);

/* pushes a fresh table of the capability module `cap` */
int sbx_caps_open(lua_State *L, uint32_t cap);

/* appends print()/log.*() arguments as one log line of the current call */
int sbx_log_args(lua_State *L, int level, const char *fname);

/* charges `n` instructions to the current call; raises once tripped */
void sbx_charge(lua_State *L, uint64_t n);

/* raises the error of a tripped limit if one tripped */
void sbx_check_tripped(lua_State *L);

/* the last chance to install a hook that a new thread inherits */
int sbx_tripped(lua_State *L);

/* bytes the current call may still allocate (SIZE_MAX: no limit) */
size_t sbx_memory_left(lua_State *L);

/*
 * records a memory trip and raises it: for native code (lua-cjson) whose
 * buffers would pass the limit outside the Lua allocator's count
 */
void sbx_trip_memory(lua_State *L);


#endif /* SBX_LIB_H */
