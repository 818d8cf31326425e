-- profile: adapts a consumer's {"full_name": "..."} to the CRM's profile
-- shape {"first_name", "last_name", ...}.
--
-- Content mode (the location has no upstream): the request hook's
-- {status=, headers=, body=} is the answer.  Capabilities: json.

local function answer(status, doc)
  return {
    status = status,
    headers = { ["content-type"] = "application/json" },
    body = json.encode(doc),
  }
end

return function(req)
  -- json.decode raises on bad input: answer 400 rather than 500
  local ok, input = pcall(json.decode, req.body or "")
  local full = ok and type(input) == "table" and input.full_name
  if type(full) ~= "string" then
    return answer(400, { error = "expected_full_name", request_id = req.id })
  end

  -- "Ada King Lovelace" -> "Ada", "King Lovelace"
  local first, last = full:match("^%s*(%S+)%s*(.-)%s*$")

  return answer(200, {
    first_name = first or "",
    last_name = last or "",
    locale = req.query.locale or "en",
    request_id = req.id,
  })
end
