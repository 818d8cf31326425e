-- Benchmark connector (connector mode, capability json), bench/connector.sh:
-- the request hook sets a header and the query string the upstream gets,
-- the response hook decodes the upstream's JSON, renames two fields, adds
-- one and encodes it.  The /openresty location of bench/connector.sh does
-- the same with access_by_lua_block and body_filter_by_lua_block.

return {
  request = function(req)
    req.headers["x-tenant"] = "acme"
    req.args = "v=2"
    return req
  end,

  response = function(res, req)
    local doc = json.decode(res.body)
    doc.name, doc.full_name = doc.full_name, nil
    doc.email, doc.email_address = doc.email_address, nil
    doc.schema = "crm.profile.v2"
    return {
      status = res.status,
      headers = { ["content-type"] = "application/json" },
      body = json.encode(doc),
    }
  end,
}
