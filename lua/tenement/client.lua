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
  return string.format("no ten server is running for this data directory (%s: %s).\n"
    .. "Start one with `ten serve` (and the same --config or --data-dir), then try again.",
    self.socket, err)
end

-- request(method, target [, body_table [, timeout_ms]]) -> status, value | nil, err
-- Must run inside a task. value is the decoded JSON (nil for an empty body).
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
    if code == "ENOENT" or code == "ECONNREFUSED" then return nil, self:unreachable(err) end
    return nil, err
  end
  local value
  if res.body and res.body ~= "" then
    local v, jerr = json.decode(res.body)
    if v == nil and jerr then return nil, "the server sent something that is not JSON: " .. jerr end
    value = v
  end
  return res.status, value
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
