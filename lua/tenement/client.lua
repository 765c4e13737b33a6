-- How `ten` commands reach a running server: HTTP with JSON over the local
-- control socket {data_dir}/ten.sock. They never start a second supervisor.
local core = require "tenement.core"
local json = require "tenement.json"

local client = {}

local Client = {}
Client.__index = Client

-- client.new{ socket = path } (local) or { server = "http://host:port", token = T } (remote)
-- -> client | nil, err
function client.new(opts)
  if opts.server then
    local scheme, host, port = opts.server:match("^(%a+)://([^/:]+):?(%d*)/?$")
    if not scheme then
      local bracketed
      scheme, bracketed, port = opts.server:match("^(%a+)://(%[[^%]]+%]):?(%d*)/?$")
      host = bracketed
    end
    if not scheme then return nil, "--server " .. opts.server .. ": expected http://HOST[:PORT]" end
    if scheme ~= "http" then
      return nil, "--server " .. opts.server .. ": only http:// is supported by this client"
    end
    local address = host == "localhost" and "127.0.0.1" or host:gsub("^%[(.*)%]$", "%1")
    if not (address:match("^%d+%.%d+%.%d+%.%d+$") or address:find(":", 1, true)) then
      -- names are not looked up (no resolver in the loop); the server's API
      -- answers on any address as it does on its domain
      return nil, string.format("--server %s: give the server's IP address (http://203.0.113.5:%s) or localhost: "
        .. "names are not looked up", opts.server, port ~= "" and port or "80")
    end
    return setmetatable({ server = opts.server, host = address, host_header = host,
      port = tonumber(port) or 80, token = opts.token }, Client)
  end
  return setmetatable({ socket = opts.socket }, Client)
end

-- The error a person sees when no server answers.
function Client:unreachable(err)
  if self.server then
    return string.format("no ten server answers at %s (%s)", self.server, err)
  end
  -- running, but without its socket (removed by hand): a new start would not help
  local pid = require("tenement.keeper").running_server(self.socket:gsub("[^/]*$", "") .. "ten.pid")
  if pid then
    return string.format("the ten server of this data directory runs (pid %d), but its control socket %s does not "
      .. "answer (%s): removed? Restart the server (kill -TERM %d, then `ten serve`)", pid, self.socket, err, pid)
  end
  return string.format("no ten server is running for this data directory (%s: %s).\n"
    .. "Start one with `ten serve` (and the same --config or --data-dir), then try again; a server started "
    .. "before data_dir changed in the file is reached with --data-dir OLD_DIR.",
    self.socket, err)
end

-- request(method, target [, body_table [, timeout_ms]]) -> status, value | nil, err, why
-- Must run inside a task. value is the decoded JSON (nil for an empty body);
-- why is "unreachable" when no server listens.
function Client:request(method, target, body, timeout_ms)
  local headers = body and { ["content-type"] = "application/json" } or {}
  if self.token then headers.authorization = "Bearer " .. self.token end
  if self.server then headers.host = self.host_header end
  local res, err, code = core.http.request {
    path = self.socket, host = self.server and self.host, port = self.server and self.port,
    method = method, target = target, headers = headers,
    body = body and json.encode(body) or nil,
    timeout = timeout_ms or 120000,
  }
  if not res then
    if code == "ENOENT" or code == "ECONNREFUSED" then return nil, self:unreachable(err), "unreachable" end
    if err == "timeout" then
      -- the server goes on with what it was asked (a stop waiting out a long
      -- stop_timeout, say): only this wait ended
      return nil, string.format("no answer within %d s; the server goes on with it, and `ten ps` shows how it "
        .. "stands", (timeout_ms or 120000) // 1000), "timeout"
    end
    return nil, err
  end
  local value
  if res.body and res.body ~= "" then
    local v, jerr = json.decode(res.body)
    if v == nil and jerr then
      -- what answered is likely not the API (a site of the front door, a
      -- proxy in front): its status and first line say what it was
      local first = res.body:match("^[^\n]*"):sub(1, 200)
      return nil, string.format("the server answered %d with something that is not JSON (%s): %s", res.status,
        jerr, require("tenement.log").printable(first))
    end
    value = v
  end
  return res.status, value
end

-- Client:events(target, on_event) follows a Server-Sent Events stream:
-- on_event(data_string, event_type) for each event (event_type "message"
-- unless the event names one), until the server closes the stream (-> true),
-- something fails, or on_event returns a string (-> nil, that string). A
-- small reader of our own, so nothing is buffered beyond one event.
function Client:events(target, on_event)
  local conn, err, code
  if self.server then
    conn, err, code = core.net.connect { host = self.host, port = self.port, timeout = 10000 }
  else
    conn, err, code = core.net.connect { path = self.socket, timeout = 10000 }
  end
  if not conn then
    if code == "ENOENT" or code == "ECONNREFUSED" then return nil, self:unreachable(err) end
    return nil, err
  end
  local head = { "GET " .. target .. " HTTP/1.1", "Host: " .. (self.host_header or "localhost"),
    "Accept: text/event-stream" }
  if self.token then head[#head + 1] = "Authorization: Bearer " .. self.token end
  local ok, werr = conn:write(table.concat(head, "\r\n") .. "\r\n\r\n")
  if not ok then conn:close() return nil, werr end

  local buf = ""
  local function more()
    local chunk, rerr = conn:read()
    if not chunk then return nil, rerr or "the server closed the stream" end
    buf = buf .. chunk
    return true
  end
  -- the response head
  while not buf:find("\r\n\r\n", 1, true) do
    local got, rerr = more()
    if not got then conn:close() return nil, rerr end
  end
  local head_end = buf:find("\r\n\r\n", 1, true)
  local status_line = buf:match("^[^\r]*")
  local status = tonumber(status_line:match("^HTTP/1%.%d (%d%d%d)"))
  local chunked = buf:sub(1, head_end):lower():find("transfer%-encoding:%s*chunked") ~= nil
  buf = buf:sub(head_end + 4)
  if status ~= 200 then
    -- an error answer: its body is JSON with the reason
    while chunked and not buf:find("\r\n0\r\n", 1, true) and more() do end
    conn:close()
    local body = chunked and buf:gsub("^%x+\r\n", ""):gsub("\r\n%x+\r\n.*$", "") or buf
    local value = json.decode(body)
    return nil, client.error_message(status, value)
  end
  -- the body: chunked framing around the event stream
  local events = ""
  while true do
    local data
    if chunked then
      local size_end = buf:find("\r\n", 1, true)
      while not size_end do
        if not more() then conn:close() return true end
        size_end = buf:find("\r\n", 1, true)
      end
      local size = tonumber(buf:sub(1, size_end - 1):match("^%x+"), 16)
      if not size then conn:close() return nil, "bad chunk in the event stream" end
      if size == 0 then conn:close() return true end
      while #buf < size_end + 1 + size + 2 do
        if not more() then conn:close() return true end
      end
      data = buf:sub(size_end + 2, size_end + 1 + size)
      buf = buf:sub(size_end + 2 + size + 2)
    else
      if buf == "" and not more() then conn:close() return true end
      data, buf = buf, ""
    end
    events = events .. data
    while true do
      local stop = events:find("\n\n", 1, true)
      if not stop then break end
      local event = events:sub(1, stop - 1)
      events = events:sub(stop + 2)
      local lines, kind = {}, "message"
      for line in (event .. "\n"):gmatch("([^\n]*)\n") do
        local value = line:match("^data: ?(.*)$")
        if value then lines[#lines + 1] = value end
        kind = line:match("^event: ?(.*)$") or kind
      end
      if #lines > 0 then
        local stop = on_event(table.concat(lines, "\n"), kind)
        if type(stop) == "string" then conn:close() return nil, stop end
      end
    end
  end
end

-- The message of an API error body, or a generic one.
function client.error_message(status, value)
  if type(value) == "table" and type(value.error) == "table" and value.error.message then
    return value.error.message
  end
  if type(value) == "table" and type(value.error) == "string" then return value.error end
  return "the server answered HTTP " .. tostring(status)
end

return client
