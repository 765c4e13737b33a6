-- Looking up the `user` a service runs as: a name from /etc/passwd, or a
-- numeric uid. (No NSS: tenement runs on servers whose service users are
-- local accounts; a numeric uid always works.)
local users = {}

local function read_lines(path)
  local f = io.open(path)
  if not f then return {} end
  local lines = {}
  for line in f:lines() do lines[#lines + 1] = line end
  f:close()
  return lines
end

-- users.lookup(spec [, passwd_path]) -> { uid, gid, name, home } | nil, err
function users.lookup(spec, passwd_path)
  local uid = math.tointeger(tonumber(spec))
  for _, line in ipairs(read_lines(passwd_path or "/etc/passwd")) do
    local name, _, u, g, _, home = line:match("^([^:]*):([^:]*):(%d+):(%d+):([^:]*):([^:]*)")
    if name and (name == spec or (uid and tonumber(u) == uid)) then
      return { uid = tonumber(u), gid = tonumber(g), name = name, home = home }
    end
  end
  if uid and uid >= 0 then return { uid = uid, gid = uid, name = tostring(uid) } end
  return nil, string.format("no user %q in /etc/passwd (create it with `useradd --system %s`, or give a numeric uid)",
    tostring(spec), tostring(spec))
end

return users
