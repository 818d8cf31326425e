-- webhook: signs a consumer's event the way the partner's endpoint expects
-- it: HMAC-SHA256 over "<timestamp>.<body>", hex, in a header.
--
-- With an upstream (connector mode) the hook would return the request with
-- these headers; in content mode it answers with the signed payload and
-- the headers it would send.  Capabilities: json hmac hex.

-- A demo secret.  Whoever can read the script can read it: keep real
-- scripts root-owned and pinned with "sha256".
local SECRET = "demo-webhook-secret"

return function(req)
  local ok, event = pcall(json.decode, req.body or "")
  if not ok or type(event) ~= "table" or type(event.event) ~= "string" then
    return { status = 400, headers = { ["content-type"] = "application/json" },
             body = json.encode({ error = "expected_event" }) }
  end

  local payload = json.encode({ type = event.event, data = event,
                                delivery_id = req.id })
  local ts = tostring(os.time())
  local sig = hex.encode(hmac.sha256(SECRET, ts .. "." .. payload))

  return {
    status = 200,
    headers = {
      ["content-type"] = "application/json",
      ["x-webhook-timestamp"] = ts,
      ["x-webhook-signature"] = "sha256=" .. sig,
    },
    body = payload,
  }
end
