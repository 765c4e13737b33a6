-- OCI runtime bundles (config.json, runtime-spec 1.0) for the sandbox
-- isolation level (runtimes/sandbox.lua, run by gVisor's runsc).
--
-- The sandbox's root file system is the host's own root, read-only: the app
-- finds its interpreter, libraries and code where they are on the host, and
-- nothing needs to be copied or unpacked per instance. Over it go a private
-- /proc, /dev and /sys, an empty tmpfs over every directory the app must not
-- see (/tmp, the data directory of all instances), and bind mounts of the
-- few host directories it may use, each at its own path so every path means
-- the same inside and out ($SOCKET_PATH, $INSTANCE_DIR, the workdir).
--
-- API
--   config(opts) -> table           the config.json document (pure)
--   encode(config) -> string        its JSON text
--   write(dir, config) -> true | nil, err   dir/config.json, mode 0600
--   mounts(opts) -> list            the mount list alone, in mount order
--   under(path, dir) -> bool        path is dir or inside it
--   DEFAULT_CAPS, DEFAULT_RLIMITS
--
-- opts = { args = {..}, env = { "K=V", .. }, cwd = "/abs", hostname = "..",
--   uid = 0, gid = 0, additional_gids = { .. },
--   binds = { { path = "/abs", rw = bool }, .. }   -- host path = sandbox path
--   hide  = { "/abs", .. }                          -- an empty tmpfs over each
--   rlimits = { NOFILE = { soft, hard }, .. }       -- default DEFAULT_RLIMITS
--   caps = { "CAP_..", .. } }                       -- default DEFAULT_CAPS
-- Malformed opts raise: they are built by the driver, never by a user.
local json = require "tenement.json"

local oci = {}

oci.VERSION = "1.0.2"

-- What `runsc spec` gives a container, and no more: root in the sandbox may
-- signal its own processes and bind ports below 1024, nothing else (no
-- CAP_DAC_OVERRIDE, no CAP_SYS_ADMIN).
oci.DEFAULT_CAPS = { "CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE" }

-- No core files on the host's disk; enough descriptors for a busy server
-- that raises its own soft limit (as Go and Node do) without being unbounded.
oci.DEFAULT_RLIMITS = {
  NOFILE = { 1024, 65536 },
  CORE = { 0, 0 },
}

local function check_abs(p, what)
  if type(p) ~= "string" or p:sub(1, 1) ~= "/" then
    error(string.format("oci: %s must be an absolute path, got %s", what, tostring(p)), 3)
  end
  if p:find("%z") then error(string.format("oci: %s contains a NUL byte", what), 3) end
end

local function strip(p)
  if #p > 1 then p = p:gsub("/+$", "") end
  return p
end

-- under("/a/b", "/a") and under("/a", "/a") are true; under("/ab", "/a") is not.
function oci.under(path, dir)
  path, dir = strip(path), strip(dir)
  if dir == "/" then return true end
  return path == dir or path:sub(1, #dir + 1) == dir .. "/"
end

local function depth(p)
  local n = 0
  for _ in p:gmatch("[^/]+") do n = n + 1 end
  return n
end

-- The mount list: the kernel file systems first, then hidden directories and
-- binds by path depth, so a parent is mounted before what goes inside it (a
-- bind under /tmp must come after the tmpfs that covers /tmp, or the tmpfs
-- would hide it). At equal paths a bind wins over a tmpfs (it is what the
-- app was given), and a read-write bind over a read-only one.
function oci.mounts(opts)
  local by_path, order = {}, {}
  local function add(dest, m)
    local old = by_path[dest]
    if old then
      if old.type == "tmpfs" and m.type == "bind" then by_path[dest] = m
      elseif old.type == "bind" and m.type == "bind" and m.rw then by_path[dest] = m end
      return
    end
    by_path[dest] = m
    order[#order + 1] = dest
  end
  for i, p in ipairs(opts.hide or {}) do
    check_abs(p, "hide[" .. i .. "]")
    if strip(p) ~= "/" then add(strip(p), { type = "tmpfs" }) end
  end
  for i, b in ipairs(opts.binds or {}) do
    if type(b) ~= "table" then error("oci: binds[" .. i .. "] must be a table", 2) end
    check_abs(b.path, "binds[" .. i .. "].path")
    if strip(b.path) ~= "/" then add(strip(b.path), { type = "bind", rw = b.rw and true or false }) end
  end
  table.sort(order, function(a, b)
    local da, db = depth(a), depth(b)
    if da ~= db then return da < db end
    return a < b
  end)

  local list = {
    { destination = "/proc", type = "proc", source = "proc", options = { "nosuid", "noexec", "nodev" } },
    -- gVisor fills a tmpfs /dev with its own null, zero, full, random,
    -- urandom, tty, ptmx and pts: none of them is the host's
    { destination = "/dev", type = "tmpfs", source = "tmpfs", options = { "nosuid", "strictatime", "mode=755" } },
    { destination = "/sys", type = "sysfs", source = "sysfs", options = { "nosuid", "noexec", "nodev", "ro" } },
  }
  for _, dest in ipairs(order) do
    local m = by_path[dest]
    if m.type == "tmpfs" then
      list[#list + 1] = { destination = dest, type = "tmpfs", source = "tmpfs",
        options = { "nosuid", "nodev", "mode=1777" } }
    else
      list[#list + 1] = { destination = dest, type = "bind", source = dest,
        options = { "rbind", m.rw and "rw" or "ro", "nosuid", "nodev" } }
    end
  end
  return list
end

local function string_list(t, what)
  if type(t) ~= "table" then error("oci: " .. what .. " must be a list of strings", 3) end
  local out = {}
  for i, s in ipairs(t) do
    if type(s) ~= "string" then error(string.format("oci: %s[%d] must be a string", what, i), 3) end
    if s:find("%z") then error(string.format("oci: %s[%d] contains a NUL byte", what, i), 3) end
    out[i] = s
  end
  return json.array(out)
end

local function id(v, what)
  v = v or 0
  if math.type(v) ~= "integer" or v < 0 or v > 0xfffffffe then
    error("oci: " .. what .. " must be an integer id", 3)
  end
  return v
end

function oci.config(opts)
  if type(opts) ~= "table" then error("oci.config: expected a table", 2) end
  local args = string_list(opts.args, "args")
  if #args == 0 then error("oci: args is empty", 2) end
  local env = string_list(opts.env or {}, "env")
  for i, kv in ipairs(env) do
    if not kv:find("=", 2, true) then error(string.format("oci: env[%d] %q is not K=V", i, kv), 2) end
  end
  check_abs(opts.cwd or "/", "cwd")
  if opts.hostname ~= nil and (type(opts.hostname) ~= "string" or #opts.hostname > 64) then
    error("oci: hostname must be a string of at most 64 bytes", 2)
  end

  local caps = string_list(opts.caps or oci.DEFAULT_CAPS, "caps")
  local rlimits = json.array()
  local names = {}
  for name in pairs(opts.rlimits or oci.DEFAULT_RLIMITS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    local l = (opts.rlimits or oci.DEFAULT_RLIMITS)[name]
    local soft, hard = l[1] or l.soft, l[2] or l.hard
    if math.type(soft) ~= "integer" or math.type(hard) ~= "integer" or soft > hard or soft < 0 then
      error("oci: rlimits." .. name .. " must be { soft, hard } integers with soft <= hard", 2)
    end
    rlimits[#rlimits + 1] = { type = "RLIMIT_" .. name, soft = soft, hard = hard }
  end

  local user = { uid = id(opts.uid, "uid"), gid = id(opts.gid, "gid") }
  if opts.additional_gids then
    local gids = json.array()
    for i, g in ipairs(opts.additional_gids) do gids[i] = id(g, "additional_gids[" .. i .. "]") end
    user.additionalGids = gids
  end

  local function copy_caps() return json.array({ table.unpack(caps) }) end
  return {
    ociVersion = oci.VERSION,
    process = {
      terminal = false,
      user = user,
      args = args,
      env = env,
      cwd = opts.cwd or "/",
      noNewPrivileges = true,
      capabilities = {
        bounding = copy_caps(), effective = copy_caps(), permitted = copy_caps(),
        inheritable = json.array(), ambient = json.array(),
      },
      rlimits = rlimits,
    },
    root = { path = "/", readonly = true },
    hostname = opts.hostname,
    mounts = oci.mounts(opts),
    linux = {
      -- no user namespace: runsc runs as root and the sandbox's kernel
      -- (the Sentry) is the boundary; the network namespace stays empty
      -- (runsc --network=none gives it a loopback only)
      namespaces = json.array({
        { type = "pid" }, { type = "network" }, { type = "ipc" }, { type = "uts" }, { type = "mount" },
      }),
    },
  }
end

function oci.encode(config)
  return json.encode(config, "  ") .. "\n"
end

-- write(dir, config) -> true | nil, err. 0600: the document holds the app's
-- environment, secrets included.
function oci.write(dir, config)
  local core = require "tenement.core"
  return core.fs.write(dir .. "/config.json", oci.encode(config), 384)
end

return oci
