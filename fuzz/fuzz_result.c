/*
 * fuzz_result.c: the validator of what a hook returns (sbx_read_result()
 * in lua-runtime/sbx_engine.c).  The script below builds a Lua value from
 * the fuzz bytes (the request body) and returns it: tables nested a few
 * levels, the field names the validator looks for, integers and floats on
 * and off the status range, NaN, infinities, long and binary strings,
 * header names and values with control characters, functions, tables with
 * metatables, arrays of values.  The first input byte picks the hook.
 *
 * Whatever comes back, the RESULT must be well formed and only carry what
 * the worker may use: a status from 200 to 599, at most SBX_MAX_HEADERS
 * headers with valid names and values, a uri starting with "/".
 */

#include "fuzz_common.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static const char  fuzz_script[] =
    "local keys = {'status', 'headers', 'body', 'uri', 'args',\n"
    "  'Content-Type', 'x-a', 'Host', 'set-cookie', 'a b', 'x\\r\\ny',\n"
    "  '', 'content-length', 'X-\\0', 1, 2, 3}\n"
    "local floats = {0/0, 1/0, -1/0, 200.5, 200.0, 599.0, 600.0, 99.9,\n"
    "  2^63, -2^63, 1e308, -0.0}\n"
    "local function decode(s)\n"
    "  local pos = 1\n"
    "  local function byte()\n"
    "    local c = s:byte(pos) or 0\n"
    "    pos = pos + 1\n"
    "    return c\n"
    "  end\n"
    "  local function str()\n"
    "    local n = byte() % 24\n"
    "    local r = s:sub(pos, pos + n - 1)\n"
    "    pos = pos + n\n"
    "    return r\n"
    "  end\n"
    "  local value\n"
    "  local function tbl(depth)\n"
    "    local t = {}\n"
    "    for i = 1, byte() % 8 do\n"
    "      local k = value(depth + 1)\n"
    "      local v = value(depth + 1)\n"
    "      if k ~= nil and k == k then t[k] = v end\n"
    "    end\n"
    "    return t\n"
    "  end\n"
    "  value = function(depth)\n"
    "    if pos > #s then return nil end\n"
    "    local op = byte() % 16\n"
    "    if op == 0 then return nil\n"
    "    elseif op == 1 then return byte() % 2 == 1\n"
    "    elseif op == 2 then return 100 + byte() * 2\n"
    "    elseif op == 3 then return floats[byte() % #floats + 1]\n"
    "    elseif op == 4 then return str()\n"
    "    elseif op == 5 or op == 6 then return keys[byte() % #keys + 1]\n"
    "    elseif op == 7 or op == 8 then\n"
    "      return depth < 5 and tbl(depth) or {}\n"
    "    elseif op == 9 then return function() end\n"
    "    elseif op == 10 then\n"
    "      return setmetatable(depth < 5 and tbl(depth) or {}, {})\n"
    "    elseif op == 11 then\n"
    "      return byte() % 2 == 1 and math.maxinteger or math.mininteger\n"
    "    elseif op == 12 then return string.rep('v', byte() * 64)\n"
    "    elseif op == 13 then return '/' .. str()\n"
    "    elseif op == 14 then\n"
    "      local a = {}\n"
    "      for i = 1, byte() % 4 do a[i] = value(depth + 1) end\n"
    "      return a\n"
    "    else return byte() - 128\n"
    "    end\n"
    "  end\n"
    "  return value(0)\n"
    "end\n"
    "return {request = function(req) return decode(req.body or '') end,\n"
    "        response = function(req, res)\n"
    "          return decode(req.body or '')\n"
    "        end}\n";


static void
fuzz_put_strz(sbx_wr_t *w, const char *s)
{
    sbx_put_str(w, s, strlen(s));
}


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t          outlen, need;
    uint8_t        *out, *call;
    unsigned        hook;
    sbx_wr_t        w;
    fuzz_result_t   res;

    static unsigned       hooks;
    static sbx_engine_t  *e;

    if (e == NULL) {
        e = fuzz_engine(fuzz_script, &hooks);
    }

    if (size < 1 || size > 64 * 1024) {
        return 0;
    }

    hook = (data[0] & 1) ? SBX_HOOK_RESPONSE : SBX_HOOK_REQUEST;
    data++;
    size--;

    /* a CALL payload with the fuzz bytes as the body */
    call = NULL;
    need = 0;

    for ( ;; ) {
        sbx_wr_init(&w, call, need);
        fuzz_put_strz(&w, "POST");
        fuzz_put_strz(&w, "/fuzz");
        fuzz_put_strz(&w, "");
        fuzz_put_strz(&w, "id");
        fuzz_put_strz(&w, "127.0.0.1");
        fuzz_put_strz(&w, "");
        fuzz_put_strz(&w, "");
        sbx_put_u32(&w, 0);
        sbx_put_u8(&w, 1);
        sbx_put_str(&w, data, size);

        if (hook == SBX_HOOK_RESPONSE) {
            sbx_put_u32(&w, 200);
            sbx_put_u32(&w, 0);
            sbx_put_u8(&w, 0);
            sbx_put_str(&w, NULL, 0);
        }

        if (call) {
            break;
        }

        need = w.need;
        call = malloc(need);
        FUZZ_CHECK(call != NULL);
    }

    FUZZ_CHECK(!w.overflow && w.need == need);

    FUZZ_CHECK(sbx_engine_call(e, 0, hook, call, need, &out, &outlen) == 0);
    FUZZ_CHECK(fuzz_read_result(out + SBX_FRAME_HDR_SIZE, outlen, &res)
               == 0);

    FUZZ_CHECK(res.outcome == SBX_OUT_RESPONSE
               || res.outcome == SBX_OUT_REQUEST
               || res.outcome == SBX_OUT_BAD_RETURN
               || res.outcome == SBX_OUT_SCRIPT_ERROR
               || res.outcome == SBX_OUT_INSTRUCTIONS
               || res.outcome == SBX_OUT_MEMORY
               || res.outcome == SBX_OUT_TIMEOUT);

    /* the response hook never sends a request upstream */
    if (hook == SBX_HOOK_RESPONSE) {
        FUZZ_CHECK(res.outcome != SBX_OUT_REQUEST);
    }

    free(call);
    sbx_engine_idle(e);

    return 0;
}
