/*
 * sbx_engine.h: the Lua side of sbx-lua-helper.  One engine holds one
 * lua_State with every script of a pool compiled into it; each call runs a
 * script's top level again in a fresh environment, on a fresh thread, so
 * nothing a request creates is reachable from the next one.
 */

#ifndef SBX_ENGINE_H
#define SBX_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "sbx_proto.h"


#define SBX_DEFAULT_MEMORY        (32 * 1024 * 1024)
#define SBX_DEFAULT_INSTRUCTIONS  10000000
#define SBX_DEFAULT_TIMEOUT_MS    500

/* hooks found when the top level ran at load time */


typedef struct sbx_engine_s  sbx_engine_t;


typedef struct {
    sbx_str_t           name;
    sbx_str_t           chunkname;      /* used in messages: "file:line:" */
    sbx_str_t           source;
    uint32_t            caps;
    uint64_t            memory;
    uint64_t            instructions;
    uint32_t            timeout_ms;
} sbx_script_t;


typedef struct {
    uint64_t            instructions;
    uint64_t            memory_peak;
    uint32_t            time_us;
} sbx_usage_t;


sbx_engine_t *sbx_engine_create(char *err, size_t errlen);
void sbx_engine_destroy(sbx_engine_t *e);

/*
 * Compiles a script (text only), checks its size, runs its top level once
 * under its limits and checks that it returns a function or a table of
 * hooks.  Returns the script's index, or -1 with a message "chunk:line: ..."
 * in err.  *hooks gets SBX_HAS_* bits.
 */
int sbx_engine_load(sbx_engine_t *e, const sbx_script_t *s, unsigned *hooks,
    char *err, size_t errlen);

/*
 * Runs one hook.  `payload` is a CALL payload (sbx_proto.h); the RESULT
 * payload is written to *out (a buffer the engine owns and reuses, valid
 * until the next call).
 */
int sbx_engine_call(sbx_engine_t *e, unsigned script, unsigned hook,
    const uint8_t *payload, size_t len, uint8_t **out, size_t *outlen);

/* Between calls: collect garbage when the heap grew past the baseline. */
void sbx_engine_idle(sbx_engine_t *e);

/*
 * Takes a baseline of the heap once all scripts are loaded; as is the
 * helper's address-space limit (0: none).
 */
void sbx_engine_ready(sbx_engine_t *e, uint64_t as);

/*
 * After a failed call: the helper's heap outside Lua grew too much (what
 * lua-cjson leaves behind on errors) and the helper should be replaced.
 */
int sbx_engine_wants_recycle(sbx_engine_t *e);

size_t sbx_engine_memory(sbx_engine_t *e);

/*
 * Configuration-time checks besides compiling: reads of globals the script
 * is not given and never assigns.  Writes "chunk:line: message\n" lines to
 * out; returns the number of problems.
 */
int sbx_engine_check(sbx_engine_t *e, const sbx_script_t *s, char *out,
    size_t outlen);

int sbx_caps_parse(const char *list, uint32_t *caps, char *err,
    size_t errlen);
const char *sbx_cap_name(uint32_t cap);

/* one-time library setup of the capabilities: before the sandbox */
int sbx_caps_init(void);


#endif /* SBX_ENGINE_H */
