-- crm: connector mode around proxy_pass.  The CRM (the toy upstream of
-- conf.d/nginx.conf) answers {"id", "full_name", "internal_score"}; API
-- consumers get {"id", "first_name", "last_name"}.
--
--   request hook   GET only (anything else is answered here, the CRM is
--                  never contacted); the consumer's credentials stay at the
--                  gateway and the CRM gets its own key.  Returning req
--                  sends it on to proxy_pass.
--   response hook  reshapes the CRM's JSON: drops internal fields, splits
--                  the name.
--
-- Capabilities: json.

-- A demo secret.  Whoever can read the script can read it: keep real
-- scripts root-owned and pinned with "sha256".
local CRM_KEY = "demo-crm-key"

local function answer(status, doc)
  return {
    status = status,
    headers = { ["content-type"] = "application/json" },
    body = json.encode(doc),
  }
end

return {
  request = function(req)
    if req.method ~= "GET" then
      local res = answer(405, { error = "method_not_allowed",
                                request_id = req.id })
      res.headers["allow"] = "GET"
      return res
    end

    -- req.headers is the complete set the CRM will get
    req.headers["authorization"] = nil
    req.headers["cookie"] = nil
    req.headers["x-crm-key"] = CRM_KEY
    req.headers["x-request-id"] = req.id
    return req
  end,

  response = function(res, req)
    if res.status == 404 then
      return answer(404, { error = "not_found", request_id = req.id })
    end

    local ok, doc = pcall(json.decode, res.body or "")
    if res.status ~= 200 or not ok or type(doc) ~= "table"
       or type(doc.full_name) ~= "string" then
      return answer(502, { error = "crm_unavailable", request_id = req.id })
    end

    -- "Ada King Lovelace" -> "Ada", "King Lovelace"; internal_score and
    -- anything else the CRM adds stay behind
    local first, last = doc.full_name:match("^%s*(%S+)%s*(.-)%s*$")

    return answer(200, {
      id = doc.id,
      first_name = first or "",
      last_name = last or "",
      request_id = req.id,
    })
  end,
}
