/*
 * fuzz_call.c: the helper's CALL decoder.  The input is a CALL payload for
 * sbx_engine_call() (after one byte choosing the hook), decoded into req
 * (and res) in a real engine holding a script that reads every field; the
 * engine is the helper's, without the process sandbox (seccomp is not what
 * is tested here).  A payload is refused (-1) or answered with a RESULT
 * that the worker's reader accepts.
 */

#include "fuzz_common.h"


int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);


static const char  fuzz_script[] =
    "local function walk(t, depth)\n"
    "  local n = 0\n"
    "  for k, v in pairs(t) do\n"
    "    n = n + #tostring(k)\n"
    "    if type(v) == 'table' and depth < 3 then\n"
    "      n = n + walk(v, depth + 1)\n"
    "    elseif type(v) == 'string' then\n"
    "      n = n + #v\n"
    "    end\n"
    "  end\n"
    "  return n\n"
    "end\n"
    "local function answer(req, res)\n"
    "  local n = walk(req, 0) + (res and walk(res, 0) or 0)\n"
    "  local h = {}\n"
    "  for k, v in pairs(req.headers) do\n"
    "    if #k < 40 then h['x-in-' .. k] = v end\n"
    "  end\n"
    "  if req.query.mode == 'request' then\n"
    "    return {uri = req.uri, args = req.args, headers = req.headers,\n"
    "            body = req.body}\n"
    "  end\n"
    "  return {status = 200 + n % 300, headers = h,\n"
    "          body = (req.body or '') .. req.method\n"
    "                 .. (req.client.ip or '')}\n"
    "end\n"
    "return {request = function(req) return answer(req) end,\n"
    "        response = function(req, res) return answer(req, res) end}\n";


int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t          outlen;
    uint8_t        *out;
    unsigned        hook;
    fuzz_result_t   res;

    static unsigned       hooks;
    static sbx_engine_t  *e;

    if (e == NULL) {
        e = fuzz_engine(fuzz_script, &hooks);
    }

    if (size < 1) {
        return 0;
    }

    hook = (data[0] & 1) ? SBX_HOOK_RESPONSE : SBX_HOOK_REQUEST;

    if (sbx_engine_call(e, 0, hook, data + 1, size - 1, &out, &outlen) == 0)
    {
        FUZZ_CHECK(fuzz_read_result(out + SBX_FRAME_HDR_SIZE, outlen, &res)
                   == 0);
    }

    sbx_engine_idle(e);

    return 0;
}
