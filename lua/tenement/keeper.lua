-- The keeper: a small process `ten serve` starts beside itself, which
-- outlives it only to clean up. Instances under process isolation have no
-- PID namespace that dies with ten, and what they fork (or what daemonises
-- with setsid) is not reached by a parent-death signal, so if ten is killed
-- outright (SIGKILL, OOM killer) their grandchildren would live on. When
-- ten goes, however it goes, the keeper kills everything left in the
-- server's instance cgroups and removes them, exactly what the next start
-- would do (cgroup.cleanup_stale), only at once.
--
-- The keeper holds the server's lock file (handed over as its stdin), so a
-- new `ten serve` on the same data directory waits until the cleanup is
-- over before it starts instances the cleanup could take for leftovers.
local core = require "tenement.core"
local cgroup = require "tenement.cgroup"
local log = require "tenement.log"

local keeper = {}

keeper.ARG = "__tenement_keeper"
local LOCK_WAIT_MS = 10000

-- The lock file of a data directory, taken once the keeper of a previous
-- server there is done. In a task. -> fd | nil, err
function keeper.lock(data_dir)
  local path = data_dir .. "/keeper.lock"
  local deadline = core.now() + LOCK_WAIT_MS
  local said = false
  while true do
    local fd, err, code = core.fs.lock(path)
    if fd then return fd end
    if code ~= "EAGAIN" then return nil, err end
    if core.now() > deadline then
      return nil, string.format("%s is still held after %d s: is another ten serve using %s?",
        path, LOCK_WAIT_MS // 1000, data_dir)
    end
    if not said then
      log.info("waiting for the cleanup after the previous server on %s", data_dir)
      said = true
    end
    core.sleep(20)
  end
end

-- keeper.start(exe, base, lock_fd) -> proc | nil, err: from ten serve;
-- exe is the ten binary.
function keeper.start(exe, base, lock_fd)
  if not exe then return nil, "the keeper runs the ten binary, and this process is not one" end
  return core.proc.spawn {
    argv = { exe, keeper.ARG, base, tostring(core.proc.getpid()) },
    env = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin" },
    stdin = lock_fd, stdout = "null", stderr = "inherit",
    -- out of the terminal's process group: a Ctrl-C is for ten, which
    -- stops its instances itself, and the keeper goes when it has gone
    setsid = true,
    pdeathsig = "SIGTERM",
  }
end

local function parent_pid()
  local stat = core.fs.read("/proc/self/stat") or ""
  -- the command may hold spaces and parentheses: the fields follow the last ')'
  return tonumber(stat:match("%)%s+%S+%s+(%d+)"))
end

-- keeper.main(base, ten_pid) -> exit code: in the keeper process.
function keeper.main(base, ten_pid)
  ten_pid = tonumber(ten_pid)
  if not base or not ten_pid then
    io.stderr:write("usage: ten ", keeper.ARG, " CGROUP_BASE TEN_PID (started by ten serve)\n")
    return 2
  end
  local code = 0
  core.run(function()
    local term = core.signal("SIGTERM")
    -- SIGTERM comes when ten dies (pdeathsig); one from anyone else while
    -- ten lives is ignored, and the parent is looked at now and then in
    -- case the signal was missed
    while parent_pid() == ten_pid do term:wait(10000) end
    local layout = cgroup.detect { base = base }
    local removed, failures = cgroup.cleanup_stale(layout)
    if #removed > 0 then
      log.warn("ten serve (pid %d) is gone: killed what was left in %d instance cgroup(s)", ten_pid, #removed)
    end
    for _, f in ipairs(failures) do
      log.error("after ten serve (pid %d): %s", ten_pid, tostring(f))
      code = 1
    end
  end)
  return code
end

return keeper
