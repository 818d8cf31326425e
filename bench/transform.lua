-- Benchmark connector (content mode, capability json): decodes the JSON
-- body, renames two fields, adds one, encodes it.  bench/openresty.lua is
-- the same transform for the in-process lua-nginx-module baseline.

return function(req)
  local doc = json.decode(req.body)
  doc.name, doc.full_name = doc.full_name, nil
  doc.email, doc.email_address = doc.email_address, nil
  doc.schema = "crm.profile.v2"
  return {
    status = 200,
    headers = { ["content-type"] = "application/json" },
    body = json.encode(doc),
  }
end
