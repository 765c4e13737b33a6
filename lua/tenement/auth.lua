-- Bearer tokens for the HTTP API.
--
-- A token is 32 random bytes in base64url (43 characters). The store keeps
-- only its SHA-256 and its first characters (the public prefix that finds
-- the row): a token this strong needs no slow password hash, so checking one
-- costs a lookup and a hash, not two Argon2 runs per call.
local core = require "tenement.core"

local auth = {}

auth.PREFIX_LEN = 8
local FAIL_WINDOW_MS = 60 * 1000
local FAIL_MAX_DELAY_MS = 5000
local FAIL_TABLE_MAX = 10000  -- addresses remembered at most

-- -> token (43 characters), prefix, hash
function auth.new_token()
  local token = core.crypto.base64url(core.crypto.random(32))
  return token, token:sub(1, auth.PREFIX_LEN), core.crypto.sha256(token)
end

-- A tenant scope: "SERVICE:ID" (that instance) or "ID" (that id in every
-- service). -> scope | nil, err
function auth.parse_scope(s)
  local config = require "tenement.config"
  local service, id = s:match("^([^:]*):([^:]*)$")
  if service then
    local ok, err = config.valid_name(service)
    if not ok then return nil, "tenant service " .. err end
    ok, err = config.valid_name(id)
    if not ok then return nil, "tenant id " .. err end
    return { service = service, id = id }
  end
  local ok, err = config.valid_name(s)
  if not ok then return nil, "tenant " .. err end
  return { id = s }
end

-- May a principal act on service:id?
function auth.allows(principal, service, id)
  if not principal then return false end
  if principal.admin then return true end
  local scope = principal.scope
  if not scope then return false end
  return scope.id == id and (scope.service == nil or scope.service == service)
end

-- "Authorization: Bearer X" -> X | nil, why. "malformed token" is a bearer
-- credential that is no token ("Bearer", "Bearer X extra"): the client
-- meant to send one.
function auth.bearer(header)
  if not header then return nil, "missing" end
  local scheme, token = header:match("^(%S+)%s*(.-)%s*$")
  if not scheme or scheme:lower() ~= "bearer" then return nil, "wrong scheme" end
  if #token ~= 43 or not token:match("^[A-Za-z0-9_-]+$") then return nil, "malformed token" end
  return token
end

-- auth.verify(store, token) -> principal | nil. Constant time in the token's
-- content: the row is found by the public prefix, the secret part is
-- compared as a hash with crypto.equal.
function auth.verify(store, token)
  local row = store:token_by_prefix(token:sub(1, auth.PREFIX_LEN))
  local hash = core.crypto.sha256(token)
  -- compare even when no row exists, so timing says nothing about prefixes
  local expected = row and row.hash or string.rep("\0", 32)
  if not core.crypto.equal(hash, expected) or not row then return nil end
  local principal = { name = row.name, admin = row.tenant == nil }
  if row.tenant then principal.scope = auth.parse_scope(row.tenant) end
  return principal
end

-- Failed attempts per client address: after a few, each further failure
-- waits longer before its 401. Never global, so an attacker slows down only
-- themselves, never the admins.
local Limiter = {}
Limiter.__index = Limiter

-- auth.limiter(free): `free` wrong tokens per address and minute go unslowed.
function auth.limiter(free)
  return setmetatable({ by_addr = {}, count = 0, free = free or 20 }, Limiter)
end

function Limiter:failed(addr, now)
  local e = self.by_addr[addr]
  if not e or now - e.first > FAIL_WINDOW_MS then
    if not e then
      if self.count >= FAIL_TABLE_MAX then self:prune(now) end
      self.count = self.count + 1
    end
    e = { first = now, n = 0 }
    self.by_addr[addr] = e
  end
  e.n = e.n + 1
  return self:delay(addr, now)
end

-- Milliseconds this address should wait now.
function Limiter:delay(addr, now)
  local e = self.by_addr[addr]
  if not e or now - e.first > FAIL_WINDOW_MS or e.n <= self.free then return 0 end
  return math.min(100 * 2 ^ (e.n - self.free - 1), FAIL_MAX_DELAY_MS) // 1
end

function Limiter:prune(now)
  for addr, e in pairs(self.by_addr) do
    if now - e.first > FAIL_WINDOW_MS then
      self.by_addr[addr] = nil
      self.count = self.count - 1
    end
  end
  if self.count >= FAIL_TABLE_MAX then -- all recent: forget everything rather than grow
    self.by_addr, self.count = {}, 0
  end
end

-- The address part of "ip:port", "[v6]:port" or "unix:path".
function auth.client_address(peer)
  if not peer then return "?" end
  return peer:match("^%[(.*)%]:%d+$") or peer:match("^([^:]+):%d+$") or peer
end

return auth
