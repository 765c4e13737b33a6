-- Isolation level "sandbox" (runtimes/sandbox.lua, lua/tenement/oci.lua):
-- real gVisor (runsc), real sandboxes, looked at from inside and outside.
--
-- Found while building it: `runsc run` does not forward signals. A SIGTERM
-- to its process group kills runsc (Go's default), its gofer and sandbox
-- die with it (parent-death signals), and the app never sees the signal: no
-- graceful stop, and the state left behind. So the driver stops the app with
-- `runsc kill` (driver.stop) and cleans up after a killed runsc
-- (driver.cleanup); the specs below pin both behaviours down.
local core = require "tenement.core"
local proc = core.proc
local fs = core.fs
local driver = require "tenement.runtimes.sandbox"
local oci = require "tenement.oci"
local support = require "support"

local PATH = "/usr/local/bin:/usr/bin:/bin"

local BACKEND = support.fixture("backend")

local function is_root()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return s:match("\nUid:%s+%d+%s+(%d+)") == "0"
end

local function exists(path) return fs.stat(path, false) ~= nil end

local slurp = support.read

-- Why the sandbox specs cannot run here, or nil. Probes once (in a task).
local why_not
local function unable()
  if why_not == nil then
    if not is_root() then
      why_not = "sandbox specs run as root"
    elseif not exists(BACKEND) then
      why_not = "no backend fixture at " .. BACKEND .. ": run through `make test-only`"
    else
      core.run(function()
        local ok, err = driver.available()
        if ok then why_not = false else why_not = "runsc cannot run here: " .. tostring(err) end
      end)
    end
  end
  return why_not or nil
end

local function read_all(pipe, timeout)
  local parts = {}
  local deadline = core.now() + (timeout or 10000)
  while true do
    local chunk, err = pipe:read(math.max(1, deadline - core.now()))
    if chunk == nil then
      assert(err == nil, err)
      return table.concat(parts)
    end
    parts[#parts + 1] = chunk
  end
end

-- An instance the way the supervisor describes it to a driver, with its
-- data directory and socket directory made (the supervisor makes them).
local function instance(dir, argv, opts)
  opts = opts or {}
  local name, id = opts.service or "svc", opts.id or "a"
  local data_dir = dir .. "/data"
  local vars = {
    name = name, id = id, data_dir = data_dir,
    instance_dir = data_dir .. "/" .. name .. "/" .. id,
    socket = opts.socket or (dir .. "/sock/" .. name .. "-" .. id .. ".sock"),
  }
  assert(fs.mkdir(vars.instance_dir, 448))
  -- sticky and open like /tmp, as the supervisor makes it: the app, not
  -- root, creates its socket there
  assert(fs.mkdir(vars.socket:match("^(.*)/"), 493))
  assert(fs.chmod(vars.socket:match("^(.*)/"), tonumber("1777", 8)))
  local env = opts.env or {
    "PATH=" .. PATH, "SOCKET_PATH=" .. vars.socket, "INSTANCE_DIR=" .. vars.instance_dir,
    "INSTANCE_ID=" .. id, "SERVICE_NAME=" .. name,
  }
  return {
    argv = type(argv) == "table" and argv or { "/bin/sh", "-c", argv },
    env = env, cwd = opts.cwd, stdout_fd = "pipe", stderr_fd = "pipe",
    service = { name = name }, id = id, vars = vars, user = opts.user, rlimits = opts.rlimits,
  }
end

local function start(inst)
  local spec = assert(driver.prepare(inst))
  assert(driver.setup(inst))
  return assert(proc.spawn(spec))
end

-- Output, status and stderr of a short sandboxed command; cleaned up after.
local function sandboxed(dir, cmd, opts)
  local inst = instance(dir, cmd, opts)
  local p = start(inst)
  local out = read_all(p.stdout)
  local err = read_all(p.stderr)
  local st = p:wait(10000)
  assert(driver.cleanup(inst))
  return out, st, err, inst
end

local function get(socket, target)
  return core.http.request { path = socket, target = target, timeout = 2000 }
end

-- Waits until the app answers on its socket. -> ms it took
local function wait_ready(socket, p)
  local t0 = core.now()
  while core.now() - t0 < 10000 do
    local res = get(socket, "/health")
    if res and res.status == 200 then return core.now() - t0 end
    assert.are.equal("running", p:status(), "the sandbox exited before it answered")
    core.sleep(5)
  end
  error("the sandboxed app did not answer on " .. socket .. " within 10 s")
end

local function sorted(t)
  local c = { table.unpack(t) }
  table.sort(c)
  return c
end

describe("sandbox isolation (gVisor)", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  describe("the OCI bundle", function()
    it("puts the host root read-only under private /proc, /dev, /sys and tmpfs over hidden paths, binds after", function()
      local cfg = oci.config {
        args = { "/app", "x" }, env = { "A=1" }, cwd = "/srv", hostname = "web-prod",
        hide = { "/tmp", "/var/lib/ten" },
        binds = { { path = "/tmp/tenement", rw = true }, { path = "/var/lib/ten/web/prod", rw = true },
                  { path = "/tmp/tenement/", rw = false } },
      }
      assert.are.same({ path = "/", readonly = true }, cfg.root)
      assert.are.same({ "/app", "x" }, cfg.process.args)
      assert.are.same({ "A=1" }, cfg.process.env)
      assert.are.equal("/srv", cfg.process.cwd)
      assert.are.equal("web-prod", cfg.hostname)
      assert.is_true(cfg.process.noNewPrivileges)
      assert.are.same({ uid = 0, gid = 0 }, cfg.process.user)
      assert.are.same(oci.DEFAULT_CAPS, cfg.process.capabilities.bounding)
      assert.are.same({}, cfg.process.capabilities.inheritable)
      local order = {}
      for _, m in ipairs(cfg.mounts) do order[#order + 1] = m.destination .. ":" .. m.type end
      assert.are.same({ "/proc:proc", "/dev:tmpfs", "/sys:sysfs", "/tmp:tmpfs", "/tmp/tenement:bind",
        "/var/lib/ten:tmpfs", "/var/lib/ten/web/prod:bind" }, order)
      -- the read-write bind wins over a read-only one of the same path
      assert.are.same({ "rbind", "rw", "nosuid", "nodev" }, cfg.mounts[5].options)
      local names = {}
      for _, ns in ipairs(cfg.linux.namespaces) do names[#names + 1] = ns.type end
      assert.are.same({ "pid", "network", "ipc", "uts", "mount" }, names)
      assert.is_nil(cfg.linux.uidMappings)
      local rl = {}
      for _, r in ipairs(cfg.process.rlimits) do rl[r.type] = { r.soft, r.hard } end
      assert.are.same({ RLIMIT_CORE = { 0, 0 }, RLIMIT_NOFILE = { 1024, 65536 } }, rl)
      -- valid JSON, and empty lists stay lists
      local text = oci.encode(cfg)
      assert.matches('"inheritable": []', text, 1, true)
      assert.are.same(cfg.process.env, require("tenement.json").decode(text).process.env)
    end)

    it("raises on malformed input (the driver builds it, never a user)", function()
      assert.has_error(function() oci.config { args = {} } end)
      assert.has_error(function() oci.config { args = { "/a" }, env = { "NOEQUALS" } } end)
      assert.has_error(function() oci.config { args = { "/a" }, cwd = "relative" } end)
      assert.has_error(function() oci.config { args = { "/a" }, binds = { { path = "rel" } } } end)
      assert.has_error(function() oci.config { args = { "/a" }, rlimits = { NOFILE = { 10, 1 } } } end)
      assert.has_error(function() oci.config { args = { "/a\0b" } } end)
      assert.is_true(oci.under("/a/b", "/a"))
      assert.is_true(oci.under("/a", "/a/"))
      assert.is_false(oci.under("/ab", "/a"))
      assert.is_true(oci.under("/x", "/"))
    end)
  end)

  describe("the driver", function()
    it("is available on this host: runsc found and a trivial sandbox run once, then remembered", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local t0 = core.now()
        assert.is_true(driver.available())
        assert.is_true(core.now() - t0 < 50, "the probe's answer is kept")
        driver.reset({ reason = "kept" })
        assert.are.same({ nil, "kept" }, { driver.available() })
        driver.reset(nil)
        assert.is_true(driver.available())
      end)
    end)

    it("says how to install gVisor when runsc is missing, and never falls back", function()
      local saved = driver.lookup
      driver.lookup = { path = dir .. "/bin", dirs = { dir .. "/sbin" } }
      driver.reset(nil)
      local ok, err = pcall(core.run, function()
        local usable, why = driver.available()
        assert.is_nil(usable)
        assert.matches("runsc (gVisor) was not found in " .. dir .. "/bin:" .. dir .. "/sbin", why, 1, true)
        assert.matches("apt-get install runsc", why, 1, true)
        assert.matches('isolation = "namespace"', why, 1, true)
        -- prepare refuses too, with the same reason
        local spec, perr = driver.prepare(instance(dir, { "/bin/true" }))
        assert.is_nil(spec)
        assert.are.equal(why, perr)
      end)
      driver.lookup = saved
      driver.reset(nil)
      assert(ok, err)
    end)

    it("a runsc that cannot run a sandbox (or hangs) is unavailable, with its own words and the fix", function()
      local saved, saved_timeout = driver.lookup, driver.PROBE_TIMEOUT_MS
      assert(fs.mkdir(dir .. "/bin"))
      support.write(dir .. "/bin/runsc", table.concat({
        "#!/bin/sh",
        'case "$1" in --version) echo "runsc version fake"; exit 0;; esac',
        'if [ -e "' .. dir .. '/hang" ]; then exec sleep 30; fi',
        'echo "running container: creating container: ptrace: operation not permitted" >&2',
        "exit 128", "",
      }, "\n"))
      assert(fs.chmod(dir .. "/bin/runsc", 493))
      driver.lookup = { path = dir .. "/bin", dirs = {} }
      driver.PROBE_TIMEOUT_MS = 500
      local ok, err = pcall(core.run, function()
        driver.reset(nil)
        local usable, why = driver.available()
        assert.is_nil(usable)
        assert.matches(dir .. "/bin/runsc could not run a trivial sandbox (exit 128)", why, 1, true)
        assert.matches("ptrace: operation not permitted", why, 1, true)
        assert.matches("apt-get install runsc", why, 1, true)
        support.write(dir .. "/hang", "")
        driver.reset(nil)
        local t0 = core.now()
        usable, why = driver.available()
        assert.is_nil(usable)
        assert.matches("no exit within 0.5 s", why, 1, true)
        assert.is_true(core.now() - t0 < 5000)
      end)
      driver.lookup, driver.PROBE_TIMEOUT_MS = saved, saved_timeout
      driver.reset(nil)
      assert(ok, err)
    end)

    it("finds runsc in PATH first, then in the usual directories", function()
      local saved = driver.lookup
      assert(fs.mkdir(dir .. "/bin"))
      support.write(dir .. "/bin/runsc", "#!/bin/sh\n")
      driver.lookup = { path = "relative:" .. dir .. "/bin", dirs = { "/usr/bin" } }
      local found = driver.locate()
      -- not executable: skipped
      driver.lookup = { path = dir .. "/bin", dirs = {} }
      local none, where = driver.locate()
      assert(fs.chmod(dir .. "/bin/runsc", 493))
      local now = driver.locate()
      driver.lookup = saved
      assert.is_true(found == "/usr/bin/runsc" or found == nil)
      assert.is_nil(none)
      assert.are.equal(dir .. "/bin", where)
      assert.are.equal(dir .. "/bin/runsc", now)
    end)

    it("plans the run: runsc's flags, a unique container id per start, no app environment for runsc", function()
      driver.reset({ runsc = "/usr/bin/runsc" })
      local inst = instance(dir, { "/srv/app", "--x" })
      local spec = assert(driver.prepare(inst))
      local s = inst.sandbox
      assert.are.equal(inst.vars.instance_dir .. ".sandbox/" .. s.cid, s.dir)
      assert.are.same({ "/usr/bin/runsc", "--root", s.dir .. "/state", "--platform=ptrace", "--ignore-cgroups",
        "--network=none", "--host-uds=create", "run", "--bundle", s.dir, s.cid }, spec.argv)
      assert.matches("^svc%-a%-%x+$", s.cid)
      assert.are.same({ "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" }, spec.env)
      assert.are.equal("SIGKILL", spec.pdeathsig)
      assert.are.equal("null", spec.stdin)
      assert.are.equal("pipe", spec.stdout)
      -- the app's own argv, behind env -u HOME (gVisor would add HOME=/root)
      assert.are.same({ "/usr/bin/env", "-u", "HOME", "--", "/srv/app", "--x" }, s.config.process.args)
      assert.are.same(inst.env, s.config.process.env)
      assert.are.equal("svc-a", s.config.hostname)
      local second = instance(dir, { "/srv/app" })
      driver.prepare(second)
      assert.are_not.equal(s.cid, second.sandbox.cid)
      -- with HOME given, nothing to take out
      local home = instance(dir, { "/srv/app" }, { env = { "HOME=/srv" } })
      driver.prepare(home)
      assert.are.same({ "/srv/app" }, home.sandbox.config.process.args)
      driver.reset(nil)
    end)

    it("binds what the app needs read-write, hides /tmp and the data directory, exposes a workdir under them read-only", function()
      driver.reset({ runsc = "/usr/bin/runsc" })
      local inst = instance(dir, { "./app" }, { cwd = dir .. "/code" })
      assert(driver.prepare(inst))
      local m = {}
      for _, x in ipairs(inst.sandbox.config.mounts) do m[x.destination] = x.type .. ":" .. (x.options[2] or "") end
      assert.are.equal("tmpfs:nodev", m["/tmp"])
      assert.are.equal("tmpfs:nodev", m[dir .. "/data"])
      assert.are.equal("bind:rw", m[dir .. "/sock"])
      assert.are.equal("bind:rw", m[dir .. "/data/svc/a"])
      assert.are.equal("bind:ro", m[dir .. "/code"])
      assert.are.equal(dir .. "/code", inst.sandbox.config.process.cwd)
      driver.reset(nil)
    end)

    it("refuses a socket directory that holds the data directory: it would expose every instance's data", function()
      driver.reset({ runsc = "/usr/bin/runsc" })
      local inst = instance(dir, { "/srv/app" }, { socket = dir .. "/svc-a.sock" })
      local spec, err = driver.prepare(inst)
      assert.is_nil(spec)
      assert.matches("holds the data directory", err, 1, true)
      driver.reset(nil)
    end)
  end)

  describe("an instance", function()
    it("serves HTTP on its Unix socket from inside the sandbox, with exactly the environment it was given", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, { BACKEND }, { env = {
          "PATH=" .. PATH, "SOCKET_PATH=" .. dir .. "/sock/svc-a.sock", "INSTANCE_DIR=" .. dir .. "/data/svc/a",
          "INSTANCE_ID=a", "GREETING=hello world", "EMPTY=" } })
        local p = start(inst)
        wait_ready(inst.vars.socket, p)
        local res = assert(get(inst.vars.socket, "/"))
        assert.are.equal(200, res.status)
        assert.matches("a", res.body)
        local env = {}
        for line in assert(get(inst.vars.socket, "/env")).body:gmatch("[^\n]+") do env[#env + 1] = line end
        assert.are.same(sorted(inst.env), sorted(env))
        assert(driver.stop(inst, p))
        assert.are.same({ code = 0, core_dumped = false }, p:wait(10000))
        assert(driver.cleanup(inst))
        assert.is_false(exists(inst.sandbox.dir))
      end)
    end)

    it("has the host's files read-only, its data directory writable (and seen on the host), /tmp private", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local outside = BACKEND:match("^(.*)/") .. "/sandbox-write-" .. core.proc.getpid()
        support.write(dir .. "/host-tmp-file", "secret")
        assert(fs.mkdir(dir .. "/data/svc/other"))
        support.write(dir .. "/data/svc/other/secret", "other tenant")
        support.write(dir .. "/data/tenement.db", "tokens")
        local out, st, err = sandboxed(dir, table.concat({
          "echo x > " .. outside .. " || echo outside=failed",
          "echo x > /etc/tenement-sandbox-probe || echo etc=failed",
          "echo inside > $INSTANCE_DIR/made-inside && echo data=ok",
          "cat " .. dir .. "/host-tmp-file || echo tmp=hidden",
          "cat " .. dir .. "/data/svc/other/secret || echo other=hidden",
          "cat " .. dir .. "/data/tenement.db || echo db=hidden",
          "echo scratch > /tmp/scratch && echo tmp=writable",
          -- as root: what stops the writes is the read-only root, not permissions
        }, "; "), { user = { uid = 0, gid = 0 } })
        assert.are.equal(0, st.code, err)
        assert.matches("outside=failed", out, 1, true)
        assert.matches("Read-only file system", err, 1, true)
        assert.matches("etc=failed", out, 1, true)
        assert.matches("data=ok", out, 1, true)
        assert.matches("tmp=hidden", out, 1, true)
        assert.matches("other=hidden", out, 1, true)
        assert.matches("db=hidden", out, 1, true)
        assert.matches("tmp=writable", out, 1, true)
        assert.is_false(exists(outside))
        assert.is_false(exists("/etc/tenement-sandbox-probe"))
        assert.is_false(exists("/tmp/scratch") and slurp("/tmp/scratch") == "scratch\n")
        assert.are.equal("inside\n", slurp(dir .. "/data/svc/a/made-inside"))
      end)
    end)

    it("without a `user`, is not root: the host's files only root may read stay closed to it", function()
      local why = unable()
      if why then pending(why) return end
      if not exists("/etc/shadow") then pending("this host has no /etc/shadow to try") return end
      core.run(function()
        local out, st, err = sandboxed(dir, table.concat({
          "id -u",
          "head -c 1 /etc/shadow >/dev/null && echo shadow=read || echo shadow=closed",
          "echo mine > $INSTANCE_DIR/file && echo data=ok",
        }, "; "))
        assert.are.equal(0, st.code, err)
        assert.are_not.equal("0", out:match("^(%d+)\n"))
        assert.matches("shadow=closed", out, 1, true)
        assert.matches("data=ok", out, 1, true)
      end)
    end)

    it("runs as the service's user (no groups, no capabilities), with its nofile and nproc limits", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, table.concat({
          "id -u; id -g; id -G", "ulimit -n; ulimit -p",
          "grep -E '^Cap(Prm|Eff)' /proc/self/status",
          "echo mine > $INSTANCE_DIR/file && echo data=ok",
        }, "; "), { user = { uid = 65534, gid = 65534 }, rlimits = { nofile = 100, nproc = 50 } })
        -- the supervisor hands the instance directory to its user
        assert(fs.chown(inst.vars.instance_dir, 65534, 65534))
        local p = start(inst)
        local out = read_all(p.stdout)
        local err = read_all(p.stderr)
        local st = p:wait(10000)
        assert(driver.cleanup(inst))
        assert.are.equal(0, st.code, err)
        local lines = {}
        for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
        assert.are.same({ "65534", "65534", "65534", "100", "50" }, { table.unpack(lines, 1, 5) })
        assert.matches("CapPrm:%s+0+\n", out)
        assert.matches("CapEff:%s+0+\n", out)
        assert.matches("data=ok", out, 1, true)
        assert.are.equal(65534, fs.stat(dir .. "/data/svc/a/file").uid)
      end)
    end)

    it("sees only its own processes in /proc, under its own hostname and gVisor's kernel", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local out, st, err = sandboxed(dir,
          "echo procs: /proc/[0-9]*; tr '\\0' ' ' < /proc/1/cmdline; echo; uname -n; uname -r")
        assert.are.equal(0, st.code, err)
        local lines = {}
        for l in out:gmatch("[^\n]+") do lines[#lines + 1] = l end
        -- only the app itself: the shell (echo and cat are builtins or its children that ended)
        assert.are.equal("procs: /proc/1", lines[1])
        assert.matches("^/bin/sh %-c echo procs:", lines[2])
        assert.are.equal("svc-a", lines[3])
        local host_release = slurp("/proc/sys/kernel/osrelease"):gsub("\n", "")
        assert.are_not.equal(host_release, lines[4])
      end)
    end)

    it("a system call gVisor does not implement fails inside (userfaultfd: ENOSYS), while the host has it", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local probe = "perl -e 'my $r = syscall(323, 0); print $r < 0 ? \"errno=\" . ($! + 0) : \"fd\", \"\\n\"'"
        local out, st, err = sandboxed(dir, probe)
        assert.are.equal(0, st.code, err)
        assert.are.equal("errno=38\n", out) -- ENOSYS
        local p = assert(proc.spawn { argv = { "/bin/sh", "-c", probe }, env = { "PATH=" .. PATH },
          stdout = "pipe", stderr = "null" })
        local native = read_all(p.stdout)
        p:wait(5000)
        assert.are_not.equal("errno=38\n", native)
      end)
    end)

    it("runsc exits with the app's status: its exit code, 128 + n for a signal", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local _, st = sandboxed(dir, "exit 7")
        assert.are.same({ code = 7, core_dumped = false }, st)
        _, st = sandboxed(dir, "kill -SEGV $$")
        assert.are.same({ code = 139, core_dumped = false }, st)
        local out, st2, err = sandboxed(dir, { dir .. "/no-such-app" })
        assert.are_not.equal(0, st2.code)
        assert.matches("no-such-app", out .. err, 1, true)
      end)
    end)

    it("stays in the cgroups runsc was started in (--ignore-cgroups): gofer and sandbox alike", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, { BACKEND })
        local p = start(inst)
        wait_ready(inst.vars.socket, p)
        local pids = driver.runsc_processes(inst.sandbox.root)
        assert.is_true(#pids >= 3, "runsc, its gofer and its sandbox")
        local mine = slurp("/proc/self/cgroup")
        for _, pid in ipairs(pids) do
          assert.are.equal(mine, slurp("/proc/" .. pid .. "/cgroup"), "pid " .. pid)
        end
        assert(driver.stop(inst, p))
        p:wait(10000)
        assert(driver.cleanup(inst))
      end)
    end)
  end)

  describe("stopping", function()
    it("keeps a start's bundle and state apart from the next one's: a rollout's old start stops and goes "
      .. "without touching the new", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local script = "trap 'exit 0' TERM; echo up; while :; do sleep 0.05; done"
        local old = instance(dir, script)
        local p_old = start(old)
        assert.are.equal("up\n", p_old.stdout:read(10000))
        -- a start that crashed long ago left its directory: the next start clears it
        local stale = old.vars.instance_dir .. ".sandbox/svc-a-dead"
        assert(fs.mkdir(stale .. "/state", 448))
        -- the rollout: the new start beside the old one, same instance
        local new = instance(dir, script)
        local p_new = start(new)
        assert.are.equal("up\n", p_new.stdout:read(10000))
        assert.are_not.equal(old.sandbox.dir, new.sandbox.dir)
        assert.is_true(exists(old.sandbox.dir))
        assert.is_false(exists(stale))
        -- the old one stops through runsc (its state is still there) and is cleaned up
        assert(driver.stop(old, p_old))
        assert.are.same({ code = 0, core_dumped = false }, p_old:wait(10000))
        assert(driver.cleanup(old))
        assert.is_false(exists(old.sandbox.dir))
        core.sleep(200)
        assert.are.equal("running", p_new:status())
        assert.is_true(#driver.runsc_processes(new.sandbox.root) > 0)
        assert(driver.stop(new, p_new))
        assert.are.same({ code = 0, core_dumped = false }, p_new:wait(10000))
        assert(driver.cleanup(new))
        -- the last start takes the directory of starts with it
        assert.is_false(exists(old.vars.instance_dir .. ".sandbox"))
      end)
    end)

    it("stop() delivers SIGTERM to the app inside: it exits cleanly and runsc removes its own state", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, "trap 'echo got TERM; exit 0' TERM; echo up; while :; do sleep 0.05; done")
        local p = start(inst)
        local line = p.stdout:read(10000)
        assert.are.equal("up\n", line)
        assert(driver.stop(inst, p))
        assert.are.same({ code = 0, core_dumped = false }, p:wait(10000))
        assert.matches("got TERM", read_all(p.stdout), 1, true)
        assert.are.same({}, fs.readdir(inst.sandbox.root))
        assert.are.same({}, driver.runsc_processes(inst.sandbox.root))
        assert(driver.cleanup(inst))
        assert.is_false(exists(inst.sandbox.dir))
        -- stopping what has already exited is no error
        assert.is_true(driver.stop(inst, p))
      end)
    end)

    it("stop() on a sandbox that is gone reports the error, so the supervisor signals the group itself", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, { "/bin/true" })
        assert(driver.prepare(inst))
        assert(driver.setup(inst))
        local ok, err = driver.stop(inst, nil)
        assert.is_nil(ok)
        assert.matches("runsc kill " .. inst.sandbox.cid, err, 1, true)
        assert(driver.cleanup(inst))
      end)
    end)

    for _, sig in ipairs { "SIGTERM", "SIGKILL" } do
      it(sig .. " to runsc's process group ends the whole sandbox at once; cleanup removes the state left", function()
        local why = unable()
        if why then pending(why) return end
        core.run(function()
          local inst = instance(dir, { BACKEND })
          local p = start(inst)
          wait_ready(inst.vars.socket, p)
          local root = inst.sandbox.root
          assert.is_true(#driver.runsc_processes(root) >= 3)
          p:kill(sig, true)
          local st = p:wait(5000)
          assert.are.equal(sig, st.signal, "runsc does not forward it: it dies of it")
          -- a killed runsc leaves its state behind
          assert.is_true(#fs.readdir(root) > 0)
          local t0 = core.now()
          assert(driver.cleanup(inst))
          assert.is_true(core.now() - t0 < 1000, "no runsc delete needed: nothing of it lives")
          assert.are.same({}, driver.runsc_processes(root))
          assert.is_false(exists(inst.sandbox.dir))
        end)
      end)
    end

    it("a start is never blocked by what a crashed one left", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, { BACKEND })
        local p = start(inst)
        wait_ready(inst.vars.socket, p)
        p:kill("SIGKILL", true)
        p:wait(5000)
        -- no cleanup: a crash of ten itself. The next start sweeps it.
        fs.unlink(inst.vars.socket)
        local again = instance(dir, { BACKEND })
        local p2 = start(again)
        wait_ready(again.vars.socket, p2)
        assert(driver.stop(again, p2))
        assert.are.equal(0, p2:wait(10000).code)
        assert(driver.cleanup(again))
        assert(driver.cleanup(inst))
      end)
    end)

    it("cleanup kills a sandbox that is still running, quickly", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local inst = instance(dir, { BACKEND })
        local p = start(inst)
        wait_ready(inst.vars.socket, p)
        assert(driver.cleanup(inst))
        local st = p:wait(10000)
        assert.is_truthy(st)
        assert.are.same({}, driver.runsc_processes(inst.sandbox.root))
        assert.is_false(exists(inst.sandbox.dir))
      end)
    end)
  end)

  describe("through the supervisor", function()
    -- Pending until lua/tenement/supervisor.lua calls the driver's hooks.
    local function hooks_missing()
      local src = slurp(package.searchpath("tenement.supervisor", package.path) or "") or ""
      if not (src:find("driver.setup", 1, true) and src:find("driver.cleanup", 1, true)
          and src:find("driver.stop", 1, true)) then
        return "the supervisor does not call the sandbox driver's setup, stop and cleanup hooks yet"
      end
    end

    local function sandbox_cfg(extra)
      local config = require "tenement.config"
      local lines = {
        "[settings]",
        string.format("data_dir = %q", dir .. "/data"),
        "stop_timeout = 5",
        "backoff_base_ms = 20",
        "[service.api]",
        string.format("command = %q", BACKEND),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
        'isolation = "sandbox"',
        'health = "/health"',
        "startup_timeout = 10",
      }
      for _, l in ipairs(extra or {}) do lines[#lines + 1] = l end
      return assert(config.parse(table.concat(lines, "\n") .. "\n", dir .. "/tenement.toml", {}))
    end

    it("spawns, serves and stops an instance with isolation = \"sandbox\"", function()
      local why = unable() or hooks_missing()
      if why then pending(why) return end
      local supervisor = require "tenement.supervisor"
      local cfg = sandbox_cfg { 'restart = "never"' }
      core.run(function()
        local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
        local inst = assert(sup:spawn("api", "prod"))
        assert.are.equal("running", inst.state)
        local res = assert(get(inst.socket, "/"))
        assert.are.equal(200, res.status)
        assert.matches("prod", res.body)
        local root = inst.launch_ctx.sandbox.root
        assert.is_true(#driver.runsc_processes(root) >= 3)
        sup:shutdown()
        assert.are.equal("stopped", inst.state)
        -- stopped through stop() (runsc kill): the app exited 0 on its SIGTERM;
        -- a SIGTERM to runsc's group would read "killed by SIGTERM"
        assert.are.equal("stopped (exited with code 0)", inst.last_exit)
        assert.are.same({}, driver.runsc_processes(root))
        assert.is_false(exists(dir .. "/data/api/prod.sandbox"))
      end)
    end)

    it("rolls a sandboxed instance out to a new definition: the new sandbox serves on, the old one goes", function()
      local why = unable() or hooks_missing()
      if why then pending(why) return end
      local supervisor = require "tenement.supervisor"
      local cfg = sandbox_cfg { 'restart = "never"' }
      local new_svc = sandbox_cfg { 'restart = "never"', "[service.api.env]", 'VERSION = "2"' }.services.api
      core.run(function()
        local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
        local inst = assert(sup:spawn("api", "prod"))
        local old_root = inst.launch_ctx.sandbox.root
        assert(sup:rollout("api", new_svc))
        assert.are.equal("running", inst.state)
        assert.are_not.equal(old_root, inst.launch_ctx.sandbox.root)
        assert.are.same({}, driver.runsc_processes(old_root))
        -- killed along with the old one, it stayed down (restart = "never") and
        -- answered nothing
        core.sleep(300)
        assert.are.equal("running", inst.state)
        assert.are.equal(0, inst.restarts)
        assert.matches("VERSION=2", assert(get(inst.socket, "/env")).body, 1, true)
        sup:shutdown()
      end)
    end)

    it("restarts a sandboxed app that crashed, in a fresh sandbox", function()
      local why = unable() or hooks_missing()
      if why then pending(why) return end
      local supervisor = require "tenement.supervisor"
      local cfg = sandbox_cfg { 'restart = "always"' }
      core.run(function()
        local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
        local inst = assert(sup:spawn("api", "prod"))
        local first = inst.pid
        core.http.request { path = inst.socket, target = "/crash", timeout = 2000 }
        local deadline = core.now() + 10000
        while not (inst.state == "running" and inst.pid and inst.pid ~= first) and core.now() < deadline do
          core.sleep(20)
        end
        assert.are.equal("running", inst.state)
        assert.are_not.equal(first, inst.pid)
        assert.are.equal(1, inst.restarts)
        assert.matches("exited with code 3", inst.last_exit, 1, true)
        assert.are.equal(200, assert(get(inst.socket, "/health")).status)
        sup:shutdown()
        assert.is_false(exists(dir .. "/data/api/prod.sandbox"))
      end)
    end)
  end)
end)
