-- Baseline: the transform of bench/transform.lua, in-process with
-- lua-nginx-module (inlined into content_by_lua_block by bench/run.sh).
local cjson = require "cjson"
ngx.req.read_body()
local doc = cjson.decode(ngx.req.get_body_data())
doc.name, doc.full_name = doc.full_name, nil
doc.email, doc.email_address = doc.email_address, nil
doc.schema = "crm.profile.v2"
ngx.status = 200
ngx.header["Content-Type"] = "application/json"
ngx.print(cjson.encode(doc))
