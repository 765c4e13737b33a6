-- Isolation level "namespace" (the default): the app runs in its own PID,
-- mount, IPC and UTS namespaces, with a /proc of its own that shows only its
-- processes, and the hostname "<service>-<id>". PID 1 there is `ten` itself
-- (`ten __tenement_init -- app...`, c/init.c), which forwards signals to
-- the app (PID 2), reaps orphans, kills what the app leaves behind and exits
-- with the app's status (128 + n when a signal killed it).
--
-- network = "isolated" adds a network namespace with only loopback up: the
-- app is reached solely through its Unix socket (a path in the file system,
-- which crosses network namespaces).
--
-- When the server may create namespaces (root), it does so directly;
-- otherwise inside a new user namespace where the server's uid and gid are
-- mapped to root: files stay the server's, and no privilege is gained.
--
-- What it is not: a wall against a hostile app. The app runs as the server's
-- user; run as root, it keeps root's power over the host (it could unmount
-- its /proc and look at the host's). The file system and, by default, the
-- network are the host's. Use "sandbox" for untrusted code.
local core = require "tenement.core"

local driver = { name = "namespace" }

local BASE_FLAGS = { "newpid", "newns", "newipc", "newuts" }
local HOSTNAME_MAX = 64

-- The result of the one probe: { userns = bool } or { reason = "..." }.
local probed

local function spawn_probe(userns)
  local flags = { table.unpack(BASE_FLAGS) }
  if userns then flags[#flags + 1] = "newuser" end
  local p, err, code = core.proc.spawn {
    argv = { "/bin/true" }, env = {}, stdin = "null", stdout = "null", stderr = "null",
    clone_flags = flags, mount_proc = true, hostname = "tenement-probe",
  }
  -- Every namespace step runs before exec: one that fails names its stage,
  -- so an exec failure (no /bin/true here) still proves them all.
  if not p and err and err:find(": exec: ", 1, true) then return true end
  if not p then return nil, err, code end
  if core.current() then p:wait(2000) end
  p:close()
  return true
end

local function why_not(err_direct, err_userns, code)
  local fix
  if err_userns and err_userns:find("mount proc on /proc", 1, true) then
    fix = "parts of this host's /proc are covered (containers mask some of its files), and then only a " ..
      "privileged process may mount a new /proc: run ten as root with CAP_SYS_ADMIN (docker run --privileged)"
  elseif code == "EPERM" or code == "EACCES" then
    fix = "run ten as root, or allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1 " ..
      "on Debian; sysctl kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu 23.10+); inside a " ..
      "container, give it CAP_SYS_ADMIN and an unmasked /proc (docker run --privileged)"
  elseif code == "ENOSPC" then
    fix = "user namespaces are limited to 0 or used up: raise sysctl user.max_user_namespaces"
  elseif code == "EINVAL" then
    fix = "this kernel lacks PID, mount, IPC, UTS or user namespaces (CONFIG_NAMESPACES)"
  else
    fix = "see the error above"
  end
  return string.format("cannot create the namespaces: %s; in a user namespace: %s. Fix: %s, " ..
    'or set isolation = "process" for the service', err_direct, err_userns or "not tried", fix)
end

-- available() -> true | nil, reason. Probes once with a real clone (about a
-- millisecond), first directly, then in a user namespace; remembers which.
function driver.available()
  if not probed then
    local ok, err = spawn_probe(false)
    if ok then
      probed = { userns = false }
    else
      local uok, uerr, ucode = spawn_probe(true)
      if uok then probed = { userns = true }
      else probed = { reason = why_not(err, uerr, ucode) } end
    end
  end
  if probed.reason then return nil, probed.reason end
  return true
end

-- For specs: forget the probe, or force its outcome ({ userns = bool }).
function driver.reset(state) probed = state end

local function hostname(service, id)
  local name = tostring(service) .. "-" .. tostring(id)
  if #name > HOSTNAME_MAX then name = name:sub(1, HOSTNAME_MAX) end
  return name
end

-- prepare(instance) -> spec for core.proc.spawn | nil, err
--   instance: { argv, env (list of "K=V"), cwd, stdout_fd, stderr_fd,
--               service (its config: name, network, ...), id, vars,
--               init_path (the ten binary, which runs as PID 1) }
function driver.prepare(instance)
  local init = instance.init_path
  if type(init) ~= "string" or init == "" then
    return nil, "namespace isolation needs the ten binary as the instance's init, and none was found " ..
      "(this process is not ten, and TENEMENT_INIT is not set): set TENEMENT_INIT to the path of ten, " ..
      'or set isolation = "process" for the service'
  end
  if init:sub(1, 1) ~= "/" then
    return nil, string.format("the init path %q must be absolute (TENEMENT_INIT)", init)
  end
  if not probed then
    local ok, err = driver.available()
    if not ok then return nil, err end
  end
  local svc = instance.service or {}
  local network = svc.network or "host"
  if network ~= "host" and network ~= "isolated" then
    return nil, string.format('network = %q: expected "host" or "isolated"', tostring(network))
  end

  local argv = { init, "__tenement_init", "--" }
  for i, a in ipairs(instance.argv) do argv[3 + i] = a end
  local flags = { table.unpack(BASE_FLAGS) }
  if network == "isolated" then flags[#flags + 1] = "newnet" end
  if probed.userns then flags[#flags + 1] = "newuser" end
  local name = svc.name or (instance.vars and instance.vars.name) or "instance"
  return require("tenement.runtime").credentials(instance, {
    argv = argv,
    env = instance.env,
    cwd = instance.cwd,
    stdin = "null",
    stdout = instance.stdout_fd,
    stderr = instance.stderr_fd,
    pdeathsig = "SIGKILL",
    clone_flags = flags,
    mount_proc = true,
    hostname = hostname(name, instance.id),
    loopback = network == "isolated" or nil,
  })
end

return driver
