-- Isolation level "namespace" (runtimes/namespace.lua, the init in c/init.c
-- as core.proc.init_fd serves it, the namespace fields of core.proc.spawn),
-- against the real kernel.
--
-- Regression: the original's "namespace" isolation called unshare in a
-- pre-exec hook, which leaves the caller itself in the host's PID namespace:
-- the app saw the host's /proc (every tenant's environment and command line)
-- and was nobody's PID 2. These specs look from inside the instance.
local core = require "tenement.core"
local proc = core.proc
local fs = core.fs
local driver = require "tenement.runtimes.namespace"
local support = require "support"

local PATH = "/usr/local/bin:/usr/bin:/bin"

local TEN = support.ten
local BACKEND = support.fixture("backend")

local function is_root()
  local f = assert(io.open("/proc/self/status"))
  local s = f:read("a")
  f:close()
  return s:match("\nUid:%s+%d+%s+(%d+)") == "0"
end

local function exists(path)
  return fs.stat(path, false) ~= nil
end

local slurp = support.read

-- The target of a symbolic link such as /proc/PID/exe (even a deleted one).
local function readlink(path)
  local code, out = support.run("readlink " .. support.quote(path))
  assert(code == 0, "readlink " .. path)
  return (out:gsub("\n$", ""))
end

-- The shared objects mapped into a process: none for a static binary.
local function shared_objects(pid)
  local out = {}
  for path in (slurp("/proc/" .. pid .. "/maps") or ""):gmatch("%s(/%S+%.so[%.%d]*)\n") do out[path] = true end
  return out
end

-- Why these specs cannot run here, or nil.
local function unable()
  if not is_root() then return "namespace specs run as root (the user-namespace path has its own spec)" end
  return nil
end

local function read_all(pipe, timeout)
  local parts = {}
  while true do
    local chunk, err = pipe:read(timeout or 5000)
    if chunk == nil then
      assert(err == nil, err)
      return table.concat(parts)
    end
    parts[#parts + 1] = chunk
  end
end

-- Reads pipe until its output matches pattern (the app said it is ready).
local function read_until(pipe, pattern, timeout)
  local buf = ""
  local deadline = core.now() + (timeout or 5000)
  while not buf:find(pattern) do
    local chunk, err = pipe:read(math.max(1, deadline - core.now()))
    if not chunk then
      error(string.format("no %q in the output (%s): %q", pattern, tostring(err or "end of file"), buf))
    end
    buf = buf .. chunk
  end
  return buf
end

-- Spawns argv (or a shell command) the way the supervisor would, through
-- the driver, with stdout and stderr as pipes.
local function ns_spawn(cmd, opts)
  opts = opts or {}
  local argv = type(cmd) == "table" and cmd or { "/bin/sh", "-c", cmd }
  local spec = assert(driver.prepare {
    argv = argv, env = opts.env or { "PATH=" .. PATH }, cwd = opts.cwd,
    service = { name = opts.service or "svc", network = opts.network, filesystem = opts.filesystem,
      mounts = opts.mounts },
    id = opts.id or "a", vars = opts.vars, config_file = opts.config_file,
  })
  return assert(proc.spawn(spec))
end

-- Output and status of a short namespaced command.
local function ns_run(cmd, opts)
  local p = ns_spawn(cmd, opts)
  local out = read_all(p.stdout)
  local err = read_all(p.stderr)
  return out, p:wait(5000), err
end

-- Host pids of the children of pid (the init's child is the app).
local function children(pid)
  local s = slurp(string.format("/proc/%d/task/%d/children", pid, pid)) or ""
  local out = {}
  for n in s:gmatch("%d+") do out[#out + 1] = tonumber(n) end
  return out
end

-- Host pids whose command name is comm (zombies included).
local function pids_named(comm)
  local out = {}
  for _, name in ipairs(assert(fs.readdir("/proc"))) do
    if name:match("^%d+$") and (slurp("/proc/" .. name .. "/comm") or "") == comm .. "\n" then
      out[#out + 1] = tonumber(name)
    end
  end
  return out
end

-- A copy of sleep under a name of its own, so its processes can be counted.
local function named_sleep(dir, name)
  local path = dir .. "/" .. name
  assert(os.execute("ln -s /bin/sleep " .. support.quote(path)))
  return path
end

describe("namespace isolation", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  describe("the driver", function()
    it("is available on this host, probed once", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        driver.reset(nil)
        assert.is_true(driver.available())
        -- the answer is kept: a forced outcome is what comes back
        driver.reset({ reason = "kept" })
        assert.are.same({ nil, "kept" }, { driver.available() })
        driver.reset(nil)
        assert.is_true(driver.available())
      end)
    end)

    it("builds the spawn spec: the init from memory, the namespaces, /proc, hostname", function()
      driver.reset({ userns = false })
      local spec = assert(driver.prepare {
        argv = { "app", "--flag" }, env = { "A=1" }, cwd = "/srv", stdout_fd = 7, stderr_fd = 8,
        service = { name = "web", network = "host" }, id = "prod",
      })
      assert.are.same({ "tenement-init", "--status-fd", "3", "--", "app", "--flag" }, spec.argv)
      assert.is_true(spec.status_pipe)
      assert.are.equal(assert(proc.init_fd()), spec.exec_fd)
      assert.are.same({ "newpid", "newns", "newipc", "newuts" }, spec.clone_flags)
      assert.is_true(spec.mount_proc)
      assert.are.equal("web-prod", spec.hostname)
      assert.is_nil(spec.loopback)
      assert.are.same({ "A=1" }, spec.env)
      assert.are.equal("/srv", spec.cwd)
      assert.are.equal(7, spec.stdout)
      assert.are.equal(8, spec.stderr)
      assert.are.equal("null", spec.stdin)
      assert.are.equal("SIGKILL", spec.pdeathsig)

      spec = assert(driver.prepare {
        argv = { "app" }, service = { name = string.rep("s", 63), network = "isolated" },
        id = string.rep("i", 63),
      })
      assert.are.same({ "newpid", "newns", "newipc", "newuts", "newnet" }, spec.clone_flags)
      assert.is_true(spec.loopback)
      assert.are.equal(64, #spec.hostname)

      driver.reset({ userns = true })
      spec = assert(driver.prepare { argv = { "app" }, service = { name = "a" }, id = "b" })
      assert.are.same({ "newpid", "newns", "newipc", "newuts", "newuser" }, spec.clone_flags)
      driver.reset(nil)
    end)

    it("refuses to prepare where the host cannot, or for a network it does not know", function()
      driver.reset({ reason = "cannot create the namespaces: (why)" })
      local spec, err = driver.prepare { argv = { "app" }, service = { name = "a" }, id = "b" }
      assert.is_nil(spec)
      assert.are.equal("cannot create the namespaces: (why)", err)
      driver.reset({ userns = false })
      spec, err = driver.prepare { argv = { "app" }, service = { name = "a", network = "bridge" }, id = "b" }
      assert.is_nil(spec)
      assert.matches('network = "bridge"', err, 1, true)
      driver.reset(nil)
    end)

    it("serves the init from one sealed memfd per process: a small static binary", function()
      local fd = assert(proc.init_fd())
      assert.are.equal(fd, proc.init_fd())
      local path = "/proc/" .. proc.getpid() .. "/fd/" .. fd
      assert.are.equal("/memfd:tenement-init (deleted)", readlink(path))
      -- close-on-exec: no child inherits it
      local flags = tonumber(slurp("/proc/self/fdinfo/" .. fd):match("flags:%s+(%d+)"), 8)
      assert.are_not.equal(0, flags & tonumber("2000000", 8))
      local f = assert(io.open(path, "rb"))
      local image = f:read("a")
      f:close()
      assert.are.equal("\127ELF", image:sub(1, 4))
      assert.is_true(#image < 256 * 1024, "the init is " .. #image .. " bytes")
      -- sealed: not a byte of it can change, from any open of it
      f = assert(io.open(path, "r+b"))
      f:write("x")
      local ok, werr = f:flush()
      f:close()
      assert.is_nil(ok)
      assert.matches("Operation not permitted", werr, 1, true)
      local tok, terr, tcode = fs.truncate(path, 0)
      assert.is_nil(tok, terr)
      assert.are.equal("EPERM", tcode)
      assert.are.equal(string.byte("E"), fs.read(path):byte(2))
    end)

    it("explains what is missing when this host cannot make the namespaces", function()
      local why = unable()
      if why then pending(why) return end
      -- No capability (bounding set empty) and no user namespace left
      -- (max_user_namespaces = 0, a per-user-namespace limit): both ways fail.
      local script = support.write(dir .. "/probe.lua", [[
        local driver = require "tenement.runtimes.namespace"
        local ok, err = driver.available()
        io.write(tostring(ok), "\n", tostring(err), "\n")
      ]])
      local code, out, err = support.run(string.format(
        "unshare -U -r sh -c 'echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --bounding-set -all " ..
        "lua5.4 -e \"package.path=%s; package.cpath=%s\" -l helper %s'",
        "[[lua/?.lua;spec/?.lua]]", "[[" .. support.build .. "/lib/?.so]]", script))
      assert.are.equal(0, code, err)
      assert.matches("^nil\n", out)
      assert.matches("cannot create the namespaces", out, 1, true)
      assert.matches("EPERM", out, 1, true)
      assert.matches("max_user_namespaces", out, 1, true)
      assert.matches('isolation = "process"', out, 1, true)
    end)

    it("names the step that failed: a /proc partly covered, as in containers, cannot be mounted unprivileged", function()
      local why = unable()
      if why then pending(why) return end
      local script = support.write(dir .. "/masked.lua", [[
        local core = require "tenement.core"
        print(core.proc.spawn { argv = { "/bin/true" }, clone_flags = { "newuser", "newpid", "newns" },
          mount_proc = true })
        print(require("tenement.runtimes.namespace").available())
      ]])
      os.execute("chmod 755 " .. support.quote(dir))
      -- in a mount namespace of its own, so the host's /proc stays as it is
      local code, out, err = support.run(string.format(
        "unshare -m sh -c 'mount --make-rprivate / && mount -t tmpfs none /proc/fs && " ..
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups " ..
        "lua5.4 -e \"package.path=%s; package.cpath=%s\" -l helper %s'",
        "[[lua/?.lua;spec/?.lua]]", "[[" .. support.abs(support.build) .. "/lib/?.so]]", script))
      if code ~= 0 and err:match("Permission denied") then
        pending("nobody cannot read the build: " .. err)
        return
      end
      assert.are.equal(0, code, err)
      local spawn_line, available_line = out:match("^([^\n]*)\n([^\n]*)\n$")
      assert.are.equal("nil\tspawn /bin/true: mount proc on /proc: EPERM: operation not permitted\tEPERM", spawn_line)
      assert.matches("^nil\tcannot create the namespaces", available_line)
      assert.matches("parts of this host's /proc are covered", available_line, 1, true)
    end)
  end)

  describe("an instance", function()
    it("runs the app as PID 2, child of the init (PID 1, the small init from memory)", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local p = ns_spawn("echo $$ $PPID; cat /proc/1/comm; echo ready; exec sleep 30")
        local out = read_until(p.stdout, "ready\n")
        assert.are.equal("2 1\ntenement-init\nready\n", out)
        -- from the host: the init is p.pid, runs the memfd (not ten), static
        -- (no shared object mapped), and has one child, the app
        assert.are.equal("/memfd:tenement-init (deleted)", readlink("/proc/" .. p.pid .. "/exe"))
        assert.are.same({}, shared_objects(p.pid))
        local kids = children(p.pid)
        assert.are.equal(1, #kids)
        -- each pid as the host sees it, then as the instance does
        local function nspid(pid) return slurp("/proc/" .. pid .. "/status"):match("\nNSpid:([^\n]*)") end
        assert.are.equal("\t" .. p.pid .. "\t1", nspid(p.pid))
        assert.are.equal("\t" .. kids[1] .. "\t2", nspid(kids[1]))
        assert.is_true(p:kill("SIGKILL", true))
        assert.are.equal("SIGKILL", p:wait(5000).signal)
      end)
    end)

    it("sees only its own processes in /proc and in ps", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local function proc_mounts()
          local n = 0
          for line in slurp("/proc/self/mountinfo"):gmatch("[^\n]+") do
            if line:match("^%S+ %S+ %S+ %S+ /proc ") then n = n + 1 end
          end
          return n
        end
        local mounts_before = proc_mounts()
        local out, st = ns_run("for p in /proc/[0-9]*; do echo ${p#/proc/}; done; echo --; " ..
          "if command -v ps >/dev/null; then ps -e -o pid= -o comm=; fi")
        assert.are.equal(0, st.code)
        local pids, ps = out:match("^(.-)%-%-\n(.*)$")
        assert.are.equal("1\n2\n", pids)
        -- the host's mount table did not get the instance's /proc
        assert.are.equal(mounts_before, proc_mounts())
        if ps == "" then return end -- no procps here: /proc said it all
        local rows = {}
        for pid, comm in ps:gmatch("%s*(%d+)%s+(%S+)\n") do rows[#rows + 1] = pid .. " " .. comm end
        assert.are.same({ "1 tenement-init", "2 sh" }, { rows[1], rows[2] })
        assert.are.equal(3, #rows) -- and ps itself
        assert.matches("^%d+ ps$", rows[3])
      end)
    end)

    it("is named <service>-<id> in its own UTS namespace; the host keeps its name", function()
      local why = unable()
      if why then pending(why) return end
      local host = slurp("/proc/sys/kernel/hostname")
      core.run(function()
        local out = ns_run("hostname; cat /proc/sys/kernel/hostname", { service = "web", id = "prod" })
        assert.are.equal("web-prod\nweb-prod\n", out)
      end)
      assert.are.equal(host, slurp("/proc/sys/kernel/hostname"))
    end)

    it("cannot see the environment, command line or processes of another instance or of the server", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local other = ns_spawn({ "/bin/sh", "-c", "echo ready; while :; do sleep 5 & wait $!; done", "tn-marker-cmdline" },
          { env = { "PATH=" .. PATH, "TN_SECRET=tn-marker-environ" }, service = "other" })
        read_until(other.stdout, "ready\n")
        local other_app = children(other.pid)[1]
        -- the host sees them: the markers are real
        assert.matches("tn-marker-environ", slurp("/proc/" .. other_app .. "/environ"), 1, true)
        local server = proc.getpid()
        assert.is_true(server > 64 and other.pid > 64 and other_app > 64)
        local out, st, err = ns_run(string.format([[
          cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\0' '\n' | grep -c 'tn-mark[e]r'
          for pid in %d %d %d; do
            if cat /proc/$pid/environ >/dev/null 2>&1; then echo "reached $pid"; fi
          done
          ls /proc | grep -c '^[0-9]'
        ]], server, other.pid, other_app))
        assert.are.equal(0, st.code, err)
        -- 0 markers, no host pid reached, 4 processes: init, sh, cat|grep or ls|grep
        local count, rest = out:match("^(%d+)\n(.*)$")
        assert.are.equal("0", count)
        assert.is_nil(rest:find("reached", 1, true), rest)
        assert.is_true(tonumber(rest:match("(%d+)\n$")) <= 4, rest)
        other:kill("SIGKILL", true)
        other:wait(5000)
      end)
    end)

    it("exits with the app's exit code; an app that cannot run gives 127 and says why", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local _, st = ns_run("exit 42")
        assert.are.same({ code = 42, core_dumped = false }, st)
        local out, st2, err = ns_run({ "/nonexistent/app" })
        assert.are.equal("", out)
        assert.are.equal(127, st2.code)
        assert.matches("tenement-init: cannot run /nonexistent/app: No such file or directory", err, 1, true)
      end)
    end)
  end)

  -- filesystem = "private": what the app sees of the host's files, from inside
  describe("a private file system", function()
    local function layout()
      local data = dir .. "/data"
      assert(fs.mkdir(data .. "/svc/a"))
      assert(fs.mkdir(data .. "/svc/b"))
      assert(fs.mkdir(dir .. "/sock"))
      support.write(data .. "/tenement.db", "the store\n")
      support.write(data .. "/svc/b/theirs", "another instance's\n")
      support.write(dir .. "/tenement.toml", "[service.svc]\n")
      assert(fs.mkdir(dir .. "/app"))
      -- the file ten serve was started with, in a directory the app is given
      support.write(dir .. "/app/tenement.toml", "[service.svc.env]\nSECRET = \"x\"\n")
      support.write(dir .. "/app/code", "the app's code\n")
      assert(fs.mkdir(dir .. "/cache"))
      return {
        filesystem = "private", config_file = dir .. "/app/tenement.toml",
        vars = { data_dir = data, instance_dir = data .. "/svc/a", socket = dir .. "/sock/svc-a.sock" },
        mounts = { dir .. "/app", dir .. "/cache:rw" },
      }
    end

    for _, userns in ipairs { false, true } do
      it("holds the system read-only, the instance's paths and mounts, and nothing else of the host"
        .. (userns and " (in a user namespace)" or ""), function()
        local why = unable()
        if why then pending(why) return end
        driver.reset({ userns = userns })
        finally(function() driver.reset(nil) end)
        local opts = layout()
        local d = dir
        -- a name of this run's own: a wall that failed leaves its files on the host
        local mark = "tn-wall-" .. dir:match("[^/]+$")
        core.run(function()
          local out, st, err = ns_run(string.format([[
            for p in %s/data/tenement.db %s/data/svc/b/theirs %s/tenement.toml /root /home /sys /var/lib; do
              test -e $p && echo "sees $p"
            done
            test -s /etc/shadow && echo "reads /etc/shadow"
            test -s %s/app/tenement.toml && echo "reads ten's config file"
            echo hi > /usr/%s 2>/dev/null && echo "writes /usr"
            echo hi > /etc/%s 2>/dev/null && echo "writes /etc"
            echo hi > %s/app/tn-wall 2>/dev/null && echo "writes a read-only mount"
            echo mine > $PWD/own && cat $PWD/own
            echo cached > %s/cache/c && cat %s/cache/c
            echo temp > /tmp/%s && cat /tmp/%s
            cat %s/app/code
            ls /proc | grep -c '^[0-9]'
            ls %s/data
            head -c 4 /dev/urandom | wc -c
            echo dev > /dev/null && echo "/dev/null takes bytes"
            grep -c . /etc/passwd >/dev/null && echo "reads /etc/passwd"
          ]], d, d, d, d, mark, mark, d, d, d, mark, mark, d, d), opts)
          assert.are.equal(0, st.code, err)
          assert.are.equal(table.concat({ "mine", "cached", "temp", "the app's code", "4", "svc", "4",
            "/dev/null takes bytes", "reads /etc/passwd", "" }, "\n"), out)
        end)
        -- the instance's and the mount's writes reached the host; nothing else did
        assert.are.equal("mine\n", slurp(d .. "/data/svc/a/own"))
        assert.are.equal("cached\n", slurp(d .. "/cache/c"))
        assert.is_false(exists("/tmp/" .. mark))
        assert.is_false(exists("/usr/" .. mark))
        assert.is_false(exists("/etc/" .. mark))
        assert.is_false(exists(d .. "/app/tn-wall"))
        -- the host's view of the files is as it was
        assert.are.same({}, fs.readdir(d .. "/data/.root"))
      end)
    end

    -- workdir = "{instance_dir}" bound read-only over the writable bind of
    -- the same directory left the app unable to write its own files
    it("binds a read-only path a writable one holds already not at all", function()
      local why = unable()
      if why then pending(why) return end
      driver.reset({ userns = false })
      finally(function() driver.reset(nil) end)
      local opts = layout()
      core.run(function()
        local out, st, err = ns_run("echo mine > own && cat own", { filesystem = "private", vars = opts.vars,
          cwd = opts.vars.instance_dir, mounts = { opts.vars.instance_dir .. "/sub" } })
        assert.are.equal(0, st.code, err)
        assert.are.equal("mine\n", out)
      end)
    end)

    -- an app (root inside) may leave links in its own directories: one
    -- where a bind is made next time must not carry a host directory in
    it("refuses a link on the way of a bind, the app's own included, and directories holding more than the app's", function()
      local why = unable()
      if why then pending(why) return end
      driver.reset({ userns = false })
      finally(function() driver.reset(nil) end)
      local opts = layout()
      local inst = opts.vars.instance_dir
      local function prepare(vars, extra)
        local svc = { name = "svc", filesystem = "private" }
        for k, v in pairs(extra or {}) do svc[k] = v end
        return driver.prepare { argv = { "/bin/true" }, env = {}, service = svc, id = "a", vars = vars }
      end
      -- the socket's directory, inside the instance's, made a link to the host's /tmp
      assert(os.execute("ln -s /tmp " .. support.quote(inst .. "/run")))
      local spec = assert(prepare { data_dir = opts.vars.data_dir, instance_dir = inst, socket = inst .. "/run/app.sock" })
      core.run(function()
        local p, err = proc.spawn(spec)
        assert.is_nil(p)
        assert.matches("file system wall: bind " .. inst .. "/run " .. inst .. "/run: ELOOP", err, 1, true)
      end)
      -- directories that would bring in more than the app's own
      for _, case in ipairs {
        { { socket = dir .. "/data/svc-a.sock" }, dir .. "/data, the socket's directory, would bring data_dir (the "
          .. "store, every instance) into the app, writable" },
        { { socket = "/tmp/svc-a.sock" }, "/tmp, the socket's directory, would bring the host's /tmp into the app, "
          .. 'writable: give it a directory of its own (socket = "/run/tenement/{name}-{id}/app.sock")' },
        { { mounts = { dir } }, dir .. ", named in mounts, would bring data_dir (the store, every instance) into the app" },
        { { mounts = { "/home:rw" } }, "/home, named in mounts, would bring the host's /home into the app, writable" },
        { { socket = dir .. "/data/svc/a.sock" }, dir .. "/data/svc, the socket's directory, would bring the "
          .. "directories of the service's other instances into the app, writable" },
        { { mounts = { dir .. "/data/svc/b" } }, dir .. "/data/svc/b, named in mounts, would bring a part of "
          .. "data_dir into the app" },
      } do
        local vars = { data_dir = opts.vars.data_dir, instance_dir = inst, socket = case[1].socket or opts.vars.socket }
        local none, err, lasting = prepare(vars, { mounts = case[1].mounts })
        assert.is_nil(none)
        assert.matches("file system wall: " .. case[2], err, 1, true)
        assert.is_true(lasting)
      end
    end)

    it("says which step of the wall failed: a mount that is not there", function()
      local why = unable()
      if why then pending(why) return end
      driver.reset({ userns = false })
      finally(function() driver.reset(nil) end)
      local opts = layout()
      opts.mounts = { dir .. "/nowhere" }
      core.run(function()
        local spec, err = driver.prepare {
          argv = { "/bin/true" }, env = {}, service = { name = "svc", filesystem = "private", mounts = opts.mounts },
          id = "a", vars = opts.vars,
        }
        assert.is_nil(spec)
        assert.are.equal("file system wall: " .. dir .. '/nowhere, named in mounts, is not there: filesystem = '
          .. "\"private\" binds it into the app's file system", err)
        -- a step the kernel refuses is named with the path
        spec = assert(driver.prepare {
          argv = { "/bin/true" }, env = {}, service = { name = "svc", filesystem = "private" }, id = "a", vars = opts.vars,
        })
        table.insert(spec.root.mounts, { "bind", dir .. "/gone", "/gone", ro = true })
        local p, serr = proc.spawn(spec)
        assert.is_nil(p)
        assert.matches("file system wall: bind " .. dir .. "/gone /gone (read-only): ENOENT", serr, 1, true)
      end)
    end)
  end)

  describe("signals", function()
    it("forwards the supervisor's SIGTERM to the app, which traps it: the init exits 0", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local p = ns_spawn("trap 'echo trapped; exit 0' TERM; echo ready; while :; do sleep 5 & wait $!; done")
        read_until(p.stdout, "ready\n")
        -- what the supervisor does: SIGTERM to the init's process group
        assert.is_true(p:kill("SIGTERM", true))
        assert.are.equal("trapped\n", read_all(p.stdout))
        assert.are.same({ code = 0, core_dumped = false }, p:wait(5000))
      end)
    end)

    it("forwards to the app's process group: the app's children get the signal too", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        -- The app waits for its child on SIGTERM; only a child that got
        -- SIGTERM itself ends, so the app ends only if the group was signalled.
        local p = ns_spawn([[
          trap 'wait $child; echo app done; exit 0' TERM
          sh -c 'trap "echo child got TERM; exit 0" TERM; echo ready; while :; do sleep 5 & wait $!; done' &
          child=$!
          while :; do wait $child; done]])
        read_until(p.stdout, "ready\n")
        p:kill("SIGTERM", true)
        assert.are.same({ code = 0, core_dumped = false }, p:wait(5000))
        assert.are.equal("child got TERM\napp done\n", read_all(p.stdout))
      end)
    end)

    it("forwards a SIGTERM sent as soon as the spawn returns, before the init could block it", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        for _ = 1, 20 do
          local p = ns_spawn("exec sleep 30")
          assert(p:kill("SIGTERM", true))
          local st = p:wait(3000)
          if not st then p:kill("SIGKILL", true) p:wait(5000) end
          assert.are.same({ signal = "SIGTERM", signum = 15, core_dumped = false }, st)
          p:close()
        end
        -- blocked for the init only: the app starts with none blocked
        local out = ns_run { "/bin/grep", "^SigBlk", "/proc/self/status" }
        assert.are.equal("SigBlk:\t0000000000000000\n", out)
      end)
    end)

    it("forwards SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 too", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local p = ns_spawn([[
          for s in INT HUP QUIT USR1 USR2; do trap "echo got $s" $s; done
          trap 'exit 0' TERM
          echo ready
          while :; do sleep 5 & wait $!; done]])
        read_until(p.stdout, "ready\n")
        for _, sig in ipairs { "INT", "HUP", "QUIT", "USR1", "USR2" } do
          assert.is_true(p:kill("SIG" .. sig, true))
          read_until(p.stdout, "got " .. sig .. "\n")
        end
        p:kill("SIGTERM", true)
        assert.are.equal(0, p:wait(5000).code)
      end)
    end)

    it("an app killed by a signal is reported killed by it, not as exit code 128 + n", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local p = ns_spawn("echo ready; exec sleep 30")
        read_until(p.stdout, "ready\n")
        local app = children(p.pid)[1]
        assert(proc.kill(app, "SIGKILL"))
        assert.are.same({ signal = "SIGKILL", signum = 9, core_dumped = false }, p:wait(5000))

        -- an app that does not handle SIGTERM dies of it, as PID 2 should
        -- (as PID 1 the kernel would have dropped the signal)
        p = ns_spawn("echo ready; exec sleep 30")
        read_until(p.stdout, "ready\n")
        p:kill("SIGTERM", true)
        assert.are.same({ signal = "SIGTERM", signum = 15, core_dumped = false }, p:wait(5000))

        -- an app that exits 137 itself was not killed
        p = ns_spawn("exit 137")
        assert.are.same({ code = 137, core_dumped = false }, p:wait(5000))
        -- the init's status pipe is its own: the app gets only stdio
        local out, st = ns_run("ls /proc/$$/fd")
        assert.are.equal(0, st.code)
        assert.are.equal("0\n1\n2\n", out)
      end)
    end)
  end)

  describe("the init", function()
    it("reaps orphans: no zombie is left in the namespace", function()
      local why = unable()
      if why then pending(why) return end
      local orphan = named_sleep(dir, "tn-orphan")
      core.run(function()
        -- Each ( ... & ) exits at once: its sleep is orphaned to PID 1.
        -- Until PID 1 reaps them, ended orphans stay in /proc as zombies.
        local out, st, err = ns_run(string.format([[
          for i in 1 2 3 4 5; do (%s 0.05 &); done
          n=0
          while grep -q '^tn-orphan$' /proc/[0-9]*/comm 2>/dev/null; do
            n=$((n + 1)); [ $n -gt 300 ] && break; sleep 0.01
          done
          for s in /proc/[0-9]*/stat; do read -r l < $s 2>/dev/null && echo "$l"; done | awk '$3 == "Z"' | wc -l
          grep -c '^tn-orphan$' /proc/[0-9]*/comm 2>/dev/null | grep -vc ':0$'
          exit 0
        ]], orphan))
        assert.are.equal(0, st.code, err)
        assert.are.equal("0\n0\n", out)
      end)
    end)

    it("keeps its status pipe from the app: an app running as a user cannot write a status of its own", function()
      local why = unable()
      if why then pending(why) return end
      if not is_root() then pending("needs root to run the app as another user") return end
      core.run(function()
        -- the init runs as the app's user too, but the pipe was made by the
        -- server, whose user owns it: /proc/1/fd/3 does not open for the
        -- app, whose 4 zero bytes ahead of the init's would read "code 0"
        local spec = assert(driver.prepare {
          argv = { "/bin/sh", "-c", [[
            if printf '\000\000\000\000' > /proc/1/fd/3; then echo wrote; else echo refused; fi
            exit 7]] },
          env = { "PATH=" .. PATH }, cwd = "/", user = { uid = 65534, gid = 65534 },
          service = { name = "svc" }, id = "a",
        })
        local p = assert(proc.spawn(spec))
        local out = read_all(p.stdout)
        assert.are.equal(7, p:wait(5000).code)
        assert.are.equal("refused\n", out)
      end)
    end)

    it("kills what the app leaves behind when it exits, even in other sessions", function()
      local why = unable()
      if why then pending(why) return end
      local left = named_sleep(dir, "tn-leftover")
      core.run(function()
        local t0 = core.now()
        local out, st = ns_run(string.format([[
          %s 30 & setsid %s 30 &
          while [ $(grep -c '^tn-leftover$' /proc/[0-9]*/comm | grep -vc ':0$') -lt 2 ]; do sleep 0.01; done
          echo ready; exit 4
        ]], left, left))
        assert.are.equal("ready\n", out)
        assert.are.equal(4, st.code)
        assert.is_true(core.now() - t0 < 5000)
        assert.are.same({}, pids_named("tn-leftover"))
      end)
    end)

    it("dies with the server, and the whole namespace with it (server SIGKILLed)", function()
      local why = unable()
      if why then pending(why) return end
      local app = named_sleep(dir, "tn-pdeath")
      local script = support.write(dir .. "/server.lua", string.format([[
        local core = require "tenement.core"
        local driver = require "tenement.runtimes.namespace"
        core.run(function()
          local spec = assert(driver.prepare { argv = { %q, "30" }, env = {}, service = { name = "p" },
            id = "d" })
          local p = assert(core.proc.spawn(spec))
          io.write("ready ", p.pid, "\n")
          io.flush()
          core.sleep(30000)
        end)
      ]], app))
      -- There is no event for processes that are not ours: poll, with a deadline.
      local function until_true(fn, what)
        local deadline = core.now() + 5000
        while not fn() do
          assert(core.now() < deadline, what)
          core.sleep(5)
        end
      end
      core.run(function()
        local server = assert(proc.spawn { argv = { "lua5.4", "-e",
          string.format("package.path=%q; package.cpath=%q", "lua/?.lua;spec/?.lua", support.abs(support.build) .. "/lib/?.so"),
          "-l", "helper", script }, env = proc.environ(), stderr = "inherit" })
        local init = tonumber(read_until(server.stdout, "ready %d+\n"):match("ready (%d+)"))
        until_true(function() return #pids_named("tn-pdeath") == 1 end, "the app did not start")
        server:kill("SIGKILL")
        assert.are.equal("SIGKILL", server:wait(5000).signal)
        -- the init, orphaned, is reaped by whoever adopts it: a zombie is dead enough
        local function init_gone()
          local stat = slurp("/proc/" .. init .. "/stat")
          return not stat or stat:match("%) (%a)") == "Z"
        end
        until_true(function() return #pids_named("tn-pdeath") == 0 and init_gone() end,
          "the instance outlived its server")
      end)
    end)

    it("outside a PID namespace, forwards and passes the status on, and kills only the app's group", function()
      local why = unable()
      if not why and not exists(TEN) then why = "no ten binary: run through `make test-only` (it sets TEN)" end
      if why then pending(why) return end
      -- the same init two ways: by hand as `ten __tenement_init`, and the
      -- small build from memory
      local ways = {
        { name = "ten __tenement_init", argv = { TEN, "__tenement_init" } },
        { name = "tenement-init", argv = { "tenement-init" }, exec_fd = assert(proc.init_fd()) },
      }
      core.run(function()
        for _, way in ipairs(ways) do
          local function spawn(args, extra)
            local spec = { argv = { table.unpack(way.argv) }, exec_fd = way.exec_fd }
            for _, a in ipairs(args) do spec.argv[#spec.argv + 1] = a end
            for k, v in pairs(extra or {}) do spec[k] = v end
            return assert(proc.spawn(spec))
          end
          local p = spawn { "--", "/bin/sh", "-c", "exit 3" }
          assert.are.equal(3, p:wait(5000).code, way.name)
          -- not PID 1, the init can die of the app's signal itself
          p = spawn { "--", "/bin/sh", "-c", "kill -KILL $$" }
          assert.are.same({ signal = "SIGKILL", signum = 9, core_dumped = false }, p:wait(5000), way.name)
          p = spawn { "--", "/bin/sh", "-c", "trap 'exit 9' USR1; echo ready; while :; do sleep 5 & wait $!; done" }
          read_until(p.stdout, "ready\n")
          p:kill("SIGUSR1")
          assert.are.equal(9, p:wait(5000).code, way.name)
          p = spawn({}, { stderr = "pipe" })
          assert.matches("usage: " .. table.concat(way.argv, " ") .. " -- COMMAND", read_all(p.stderr), 1, true)
          assert.are.equal(125, p:wait(5000).code, way.name)
        end
      end)
    end)
  end)

  describe("network = \"isolated\"", function()
    it("has only lo, up, and cannot reach the host's 127.0.0.1", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local l = assert(core.net.listen { host = "127.0.0.1", port = 0 })
        local port = l:port()
        local probe = string.format([[
          tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
          if bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d' 2>/dev/null; then echo host-reached; else echo host-unreachable; fi
          # lo works: a server inside answers on 127.0.0.1
          SOCKET_PATH=%s/inner.sock PORT=5555 BACKEND_TCP=1 %s >/dev/null &
          n=0
          until bash -c 'exec 3<>/dev/tcp/127.0.0.1/5555' 2>/dev/null; do
            n=$((n + 1)); [ $n -gt 500 ] && break; sleep 0.01
          done
          [ $n -le 500 ] && echo lo-works
        ]], port, dir, BACKEND)
        local out, st, err = ns_run(probe, { network = "isolated" })
        assert.are.equal(0, st.code, err)
        assert.are.equal("lo\nhost-unreachable\nlo-works\n", out)
        -- the same probe on the host network does reach the listener
        out = ns_run(string.format("bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d' && echo host-reached", port),
          { network = "host" })
        assert.are.equal("host-reached\n", out)
        l:close()
      end)
    end)

    it("joins a namespace made ahead once the pool has one, isolated the same", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        driver.reset({ userns = false }) -- which empties the pool
        local pool = driver.netns
        -- the first take finds none and starts the filling
        ns_run("true", { network = "isolated" })
        for _ = 1, 500 do
          if #pool.ready == 2 then break end
          core.sleep(10)
        end
        assert.are.equal(2, #pool.ready)
        local l = assert(core.net.listen { host = "127.0.0.1", port = 0 })
        local probe = string.format([[
          tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '
          bash -c 'exec 3<>/dev/tcp/127.0.0.1/%d' 2>&1 | grep -o 'Connection refused' | head -1
        ]], l:port())
        local spec = assert(driver.prepare { argv = { "/bin/sh", "-c", probe }, env = { "PATH=" .. PATH },
          service = { name = "a", network = "isolated" }, id = "b" })
        assert.is_number(spec.netns_fd)
        assert.are.same({ "newpid", "newns", "newipc", "newuts" }, spec.clone_flags)
        assert.is_nil(spec.loopback)
        local p = assert(proc.spawn(spec))
        local out, err = read_all(p.stdout), read_all(p.stderr)
        assert.are.equal(0, p:wait(5000).code, err)
        -- only lo, up (refused, not unreachable), and the host's listener is not there
        assert.are.equal("lo\nConnection refused\n", out)
        l:close()
      end)
    end)

    it("is reached through a Unix socket the app binds in a directory of the host", function()
      local why = unable()
      if why then pending(why) return end
      core.run(function()
        local sock = dir .. "/app.sock"
        local p = ns_spawn({ BACKEND }, { network = "isolated", id = "net1",
          env = { "PATH=" .. PATH, "SOCKET_PATH=" .. sock, "INSTANCE_ID=net1" } })
        read_until(p.stdout, "listening on")
        local res = assert(core.http.request { path = sock, target = "/", timeout = 2000 })
        assert.are.equal(200, res.status)
        assert.matches("net1", res.body, 1, true)
        p:kill("SIGTERM", true)
        assert.are.equal(0, p:wait(5000).code)
        assert.is_false(exists(sock))
      end)
    end)
  end)

  describe("core.proc.spawn", function()
    it("refuses namespace setup that would change the host itself", function()
      local function spawn_error(spec)
        spec.argv = spec.argv or { "/bin/true" }
        local ok, err = pcall(proc.spawn, spec)
        assert.is_false(ok)
        return err
      end
      assert.matches("mount_proc needs clone_flags newns and newpid",
        spawn_error { mount_proc = true, clone_flags = { "newpid" } }, 1, true)
      assert.matches("mount_proc needs", spawn_error { mount_proc = true, clone_flags = { "newns" } }, 1, true)
      assert.matches("hostname needs clone_flag newuts", spawn_error { hostname = "x" }, 1, true)
      assert.matches("loopback needs clone_flag newnet", spawn_error { loopback = true }, 1, true)
      assert.matches("hostname must be 1 to 64", spawn_error { hostname = string.rep("h", 65),
        clone_flags = { "newuts" } }, 1, true)
      assert.matches("hostname must be 1 to 64", spawn_error { hostname = "", clone_flags = { "newuts" } }, 1, true)
      assert.matches("spec.hostname must be a string", spawn_error { hostname = {}, clone_flags = { "newuts" } }, 1, true)
      assert.matches("spec.mount_proc must be a boolean", spawn_error { mount_proc = 1 }, 1, true)
      assert.matches("groups cannot be set in a new user namespace",
        spawn_error { groups = { 1 }, clone_flags = { "newuser" } }, 1, true)
    end)

    it("works without root, inside a user namespace that maps the caller to root", function()
      local why = unable()
      if why then pending(why) return end
      local script = support.write(dir .. "/userns.lua", [[
        local core = require "tenement.core"
        local driver = require "tenement.runtimes.namespace"
        assert(driver.available())
        core.run(function()
          local spec = assert(driver.prepare { argv = { "/bin/sh", "-c",
            "echo $$ $PPID $(id -u) $(hostname); cat /proc/1/comm" },
            env = { "PATH=/usr/bin:/bin" }, service = { name = "u", network = "isolated" }, id = "ns" })
          io.write(table.concat(spec.clone_flags, ","), "\n")
          local p = assert(core.proc.spawn(spec))
          local out = {}
          while true do local c = p.stdout:read(5000) if not c then break end out[#out + 1] = c end
          io.write(table.concat(out), p:wait(5000).code, "\n")
        end)
      ]])
      os.execute("chmod 755 " .. support.quote(dir))
      local code, out, err = support.run(string.format(
        "cd %s && setpriv --reuid=65534 --regid=65534 --clear-groups " ..
        "lua5.4 -e \"package.path=%s; package.cpath=%s\" -l helper %s",
        support.quote(os.getenv("PWD")), "[[lua/?.lua;spec/?.lua]]",
        "[[" .. support.abs(support.build) .. "/lib/?.so]]", script))
      if code ~= 0 and err:match("Permission denied") then
        pending("nobody cannot read the build: " .. err)
        return
      end
      assert.are.equal(0, code, err)
      assert.are.equal("newpid,newns,newipc,newuts,newnet,newuser\n2 1 0 u-ns\ntenement-init\n0\n", out)
    end)
  end)

  describe("through the supervisor", function()
    it("runs, answers on its socket and stops a namespaced service", function()
      local why = unable()
      if why then pending(why) return end
      local config = require "tenement.config"
      local supervisor = require "tenement.supervisor"
      local text = table.concat({
        "[settings]",
        string.format("data_dir = %q", dir .. "/data"),
        "stop_timeout = 2",
        "[service.web]",
        string.format("command = %q", BACKEND),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
        'isolation = "namespace"',
        'health = "/health"',
        "startup_timeout = 3",
        "[service.quiet]",
        string.format("command = %q", BACKEND),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
        'isolation = "namespace"',
        'network = "isolated"',
        "startup_timeout = 3",
      }, "\n") .. "\n"
      local cfg = assert(config.parse(text, dir .. "/tenement.toml", {}))
      core.run(function()
        driver.reset(nil)
        local sup = supervisor.new(cfg, { environ = { PATH = PATH } })
        local web = assert(sup:spawn("web", "prod"))
        local quiet = assert(sup:spawn("quiet", "q1"))
        for _, inst in ipairs { web, quiet } do
          assert.are.equal("running", inst.state)
          local res = assert(core.http.request { path = inst.socket, target = "/env", timeout = 2000 })
          assert.are.equal(200, res.status)
          assert.matches("INSTANCE_ID=" .. inst.id, res.body, 1, true)
          -- inst.pid is the init; its one child is the backend
          assert.are.equal("tenement-init\n", slurp("/proc/" .. inst.pid .. "/comm"))
          local kids = children(inst.pid)
          assert.are.equal(1, #kids)
          assert.are.equal("backend\n", slurp("/proc/" .. kids[1] .. "/comm"))
        end
        -- an app SIGKILLed inside its namespace: the exit says so (not
        -- "exited with code 137"), as `ten ps` shows it in LAST EXIT
        assert(proc.kill(children(quiet.pid)[1], "SIGKILL"))
        local deadline = core.now() + 3000
        while not quiet.last_exit and core.now() < deadline do core.sleep(10) end
        assert.matches("^killed by SIGKILL", quiet.last_exit or "none")
        local pid = web.pid
        assert.is_true(sup:stop("web", "prod"))
        assert.are.equal("stopped", web.state)
        -- SIGTERM went through the init to the backend, which exited 0
        assert.matches("exited with code 0", web.last_exit, 1, true)
        assert.is_false(exists("/proc/" .. pid .. "/status"))
        sup:shutdown()
        assert.are.equal("stopped", quiet.state)
      end)
    end)
  end)
end)
