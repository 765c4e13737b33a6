-- Finds the driver for an isolation level and checks that it keeps the
-- contract (available, prepare). A level the host cannot provide fails
-- loudly with the reason; it never falls back to a weaker one.
local core = require "tenement.core"

local runtime = {}

local planned = {
  firecracker = "firecracker VMs are not available yet",
  qemu = "qemu VMs are not available yet",
  wasm = "wasm isolation is not available yet",
}

local cache = {}

-- runtime.planned(level) -> why it cannot start yet | nil: the levels the
-- file accepts before a driver exists (config warns of them at load)
function runtime.planned(level) return planned[level] end

-- runtime.get(level) -> driver | nil, err
function runtime.get(level)
  if cache[level] then return cache[level] end
  local ok, driver = pcall(require, "tenement.runtimes." .. level)
  if not ok then
    local why = planned[level]
    if why then
      return nil, string.format('%s: set isolation = "namespace" (or "sandbox") for this service, or use a newer ten',
        why)
    end
    return nil, string.format("unknown isolation level %q (%s)", level, tostring(driver))
  end
  if type(driver) ~= "table" or type(driver.available) ~= "function" or type(driver.prepare) ~= "function" then
    return nil, string.format("runtime driver %q is broken: it must return a table with available() and prepare()", level)
  end
  for _, hook in ipairs { "setup", "stop", "cleanup" } do
    if driver[hook] ~= nil and type(driver[hook]) ~= "function" then
      return nil, string.format("runtime driver %q is broken: %s must be a function", level, hook)
    end
  end
  local usable, reason = driver.available()
  if not usable then
    return nil, string.format("isolation %q cannot run on this host: %s", level, reason or "no reason given")
  end
  cache[level] = driver
  return driver
end

-- runtime.nofile_max() -> the highest nofile an app started by this server
-- can get, and what sets it | nil where the host does not say. The kernel's
-- fs.nr_open bounds every process; without CAP_SYS_RESOURCE (root in a
-- container often lacks it), so does the hard limit this server runs under,
-- which its children inherit and cannot raise.
function runtime.nofile_max()
  local most = tonumber(core.fs.read("/proc/sys/fs/nr_open") or "")
  local why = "fs.nr_open"
  local caps = tonumber((core.fs.read("/proc/self/status") or ""):match("\nCapEff:%s*(%x+)") or "", 16)
  local _, hard = core.proc.rlimit("nofile")
  if caps and caps & (1 << 24) == 0 and math.type(hard) == "integer" and (not most or hard < most) then
    most, why = hard, "the hard limit ten serve runs under, which it lacks CAP_SYS_RESOURCE to raise"
  end
  return most, why
end

-- The spawn fields every driver that runs the app directly shares: the
-- service's user (its uid and gid, no supplementary groups, no new
-- privileges: a non-root uid holds no capabilities after exec) and rlimits.
-- instance.user = { uid, gid } or nil; instance.rlimits = { nofile =, nproc = }.
-- -> spec | nil, err, lasting (true: the configuration itself cannot start;
-- a driver's prepare passes it on, and the restart policy gives up at once)
function runtime.credentials(instance, spec)
  local user = instance.user
  if user then
    spec.uid, spec.gid, spec.groups, spec.no_new_privs = user.uid, user.gid, {}, true
  end
  local rl = instance.rlimits
  if rl and rl.nproc and (user and user.uid or core.proc.geteuid()) == 0 then
    -- fork never checks RLIMIT_NPROC for root: written, it would limit nothing
    return nil, string.format("nproc = %d cannot limit an app that runs as root (the kernel exempts " ..
      "root from it): set pids_limit, a cgroup limit that holds root too, or a user for the service",
      rl.nproc), true
  end
  local most, why
  if rl and rl.nofile then most, why = runtime.nofile_max() end
  if most and rl.nofile > most then
    return nil, string.format("nofile = %d is more than this server can give (%s, %d): set at most %d",
      rl.nofile, why, most, most), true
  end
  if rl and next(rl) then spec.rlimits = rl end
  return spec
end

return runtime
