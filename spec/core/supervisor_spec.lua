-- The supervisor with real processes: the C backend fixture on real sockets.
local core = require "tenement.core"
local config = require "tenement.config"
local supervisor = require "tenement.supervisor"
local support = require "support"
local json = require "tenement.json"

local BACKEND = support.build .. "/fixtures/backend"
if BACKEND:sub(1, 1) ~= "/" then BACKEND = os.getenv("PWD") .. "/" .. BACKEND end

-- A configuration with one service per entry of `services` (name -> extra TOML lines).
local function make_cfg(dir, services, settings)
  local lines = {
    "[settings]",
    string.format("data_dir = %q", dir .. "/data"),
    "health_check_interval = 1",
    "backoff_base_ms = 20",
    "backoff_max_ms = 200",
    "stop_timeout = 1",
  }
  for _, l in ipairs(settings or {}) do lines[#lines + 1] = l end
  for name, extra in pairs(services) do
    lines[#lines + 1] = "[service." .. name .. "]"
    -- the extra lines of the service's own table override these defaults
    local defaults = {
      command = string.format("%q", BACKEND),
      socket = string.format("%q", dir .. "/sock/{name}-{id}.sock"),
      isolation = '"process"',
      startup_timeout = "2",
    }
    for _, l in ipairs(extra) do
      if l:match("^%[") then break end
      local key = l:match("^([%w_]+) =")
      if key then defaults[key] = nil end
    end
    for key, value in pairs(defaults) do lines[#lines + 1] = key .. " = " .. value end
    for _, l in ipairs(extra) do lines[#lines + 1] = l end
  end
  return assert(config.parse(table.concat(lines, "\n") .. "\n", dir .. "/tenement.toml", {}))
end

local function get(inst, target)
  return core.http.request { path = inst.socket, target = target, timeout = 2000 }
end

local function states_of(events, key)
  local out = {}
  for _, e in ipairs(events) do
    if e.instance == key then out[#out + 1] = e.to end
  end
  return table.concat(out, " ")
end

local function exists(path)
  local f = io.open(path)
  if f then f:close() return true end
  return false
end

describe("supervisor", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  it("spawns an instance that answers on its socket, with exactly the documented environment", function()
    local cfg = make_cfg(dir, { api = { 'health = "/health"', '[service.api.env]', 'GREETING = "hi {id} {port}"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin", SECRET_TOKEN = "x", LANG = "C.UTF-8" } })
      local events = {}
      sup:on(function(e) events[#events + 1] = e end)
      local inst = assert(sup:spawn("api", "prod"))
      assert.are.equal("running", inst.state)
      assert.are.equal("starting running", states_of(events, "api:prod"))
      local res = assert(get(inst, "/"))
      assert.are.equal(200, res.status)
      assert.matches("prod", res.body)
      local env = assert(get(inst, "/env")).body
      local vars = {}
      for k, v in env:gmatch("([%w_]+)=([^\n]*)") do vars[k] = v end
      assert.are.equal(tostring(inst.port), vars.PORT)
      assert.is_true(inst.port >= 30000 and inst.port <= 40000)
      assert.are.equal(inst.socket, vars.SOCKET_PATH)
      assert.are.equal(dir .. "/data/api/prod", vars.INSTANCE_DIR)
      assert.are.equal("prod", vars.INSTANCE_ID)
      assert.are.equal("api", vars.SERVICE_NAME)
      assert.are.equal("hi prod " .. inst.port, vars.GREETING)
      assert.are.equal("C.UTF-8", vars.LANG)
      assert.is_nil(vars.SECRET_TOKEN)
      local names = {}
      for k in pairs(vars) do names[#names + 1] = k end
      table.sort(names)
      assert.are.same({ "GREETING", "INSTANCE_DIR", "INSTANCE_ID", "LANG", "PATH", "PORT",
        "SERVICE_NAME", "SOCKET_PATH" }, names)
      assert.is_true(exists(dir .. "/data/api/prod"))
      -- spawning again is idempotent
      assert.are.equal(inst, assert(sup:spawn("api", "prod")))
      sup:shutdown()
      assert.are.equal("stopped", inst.state)
    end)
  end)

  it("refuses unknown services and bad ids with a clear error", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err, code = sup:spawn("nope", "x")
      assert.is_nil(inst)
      assert.matches('no service "nope"', err, 1, true)
      assert.are.equal("not_found", code)
      inst, err, code = sup:spawn("api", "../etc")
      assert.is_nil(inst)
      assert.are.equal("bad_request", code)
      assert.matches("not a valid name", err, 1, true)
    end)
  end)

  it("reports a start that fails, with the reason and last output, and releases everything", function()
    local cfg = make_cfg(dir, {
      missing = { 'command = "/nonexistent/app"', 'restart = "never"' },
      nosock = { 'restart = "never"', "startup_timeout = 1", "[service.nosock.env]", 'BACKEND_NO_SOCKET = "1"' },
      nothere = { 'restart = "never"', "startup_timeout = 1", 'health = "/nothere"' },
    })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err = sup:spawn("missing", "a")
      assert.is_nil(inst)
      assert.matches("spawn failed", err, 1, true)
      assert.matches("command: /nonexistent/app is not there, or not executable", err, 1, true)
      -- refused before a process, as a missing user is: failed, until a spawn
      local m = sup:get("missing", "a")
      assert.are.equal("failed", m.state)
      assert.is_nil(next(sup.ports))

      inst, err = sup:spawn("nosock", "b")
      assert.is_nil(inst)
      assert.matches("did not accept connections", err, 1, true)
      assert.matches("startup_timeout = 1 s", err, 1, true)
      assert.is_nil(next(sup.ports))
      -- the id is not wedged: a new spawn runs the whole start again
      local t0 = core.now()
      inst = sup:spawn("nosock", "b")
      assert.is_nil(inst)
      assert.is_true(core.now() - t0 >= 900)

      -- an app that answers, but not 2xx: the answer is in the reason
      inst, err = sup:spawn("nothere", "c")
      assert.is_nil(inst)
      assert.matches("did not answer GET /nothere with 2xx", err, 1, true)
      assert.matches("(the last answer: GET /nothere answered 404)", err, 1, true)
    end)
  end)

  it("fails at once a start whose health path answered a client error, and retries one that answered 503", function()
    local cfg = make_cfg(dir, {
      gone = { "startup_timeout = 1", 'health = "/nothere"' },
      busy = { "startup_timeout = 1", 'health = "/health"', "[service.busy.env]", 'BACKEND_HEALTH_STATUS = "503"' },
    }, { "max_restarts = 1" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err = sup:spawn("gone", "a")
      assert.is_nil(inst)
      assert.matches("(the last answer: GET /nothere answered 404)", err, 1, true)
      local gone = sup:get("gone", "a")
      assert.are.equal("failed", gone.state)
      assert.are.equal(0, gone.restarts)
      assert.matches("; not retried: no retry can mend this", gone.last_exit, 1, true)

      inst, err = sup:spawn("busy", "a")
      assert.is_nil(inst)
      assert.matches("(the last answer: GET /health answered 503)", err, 1, true)
      local busy = sup:get("busy", "a")
      assert.are.equal("failed", busy.state)
      assert.are.equal(1, busy.restarts)
      assert.matches("gave up: restarted 1 time", busy.last_exit, 1, true)
    end)
  end)

  it("leaves alone what is at its socket's path unless it is a stale socket", function()
    local cfg = make_cfg(dir, { api = { 'restart = "never"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      assert(core.fs.mkdir(dir .. "/sock", 493))
      -- a file that is not a socket
      support.write(dir .. "/sock/api-file.sock", "mine")
      local inst, err = sup:spawn("api", "file")
      assert.is_nil(inst)
      assert.matches("exists and is not a socket: refusing to remove it", err, 1, true)
      assert.is_true(exists(dir .. "/sock/api-file.sock"))
      -- a socket something listens on: another server's instance
      local l = assert(core.net.listen { path = dir .. "/sock/api-live.sock" })
      inst, err = sup:spawn("api", "live")
      assert.is_nil(inst)
      assert.matches("api-live.sock is in use: another process listens on it", err, 1, true)
      assert(core.net.connect { path = dir .. "/sock/api-live.sock", timeout = 1000 }):close()
      l:close()
      -- a socket nothing listens on any more: removed, and the start goes on
      local dead = assert(core.proc.spawn { argv = { BACKEND }, env = { "SOCKET_PATH=" .. dir .. "/sock/api-stale.sock" },
        stdout = "pipe" })
      assert.matches("listening", dead.stdout:read(5000), 1, true)
      dead:kill("SIGKILL")
      dead:wait(5000)
      assert.are.equal("socket", core.fs.stat(dir .. "/sock/api-stale.sock", false).type)
      inst = assert(sup:spawn("api", "stale"))
      assert.are.equal(200, assert(get(inst, "/health")).status)
      sup:shutdown()
    end)
  end)

  it("takes an answer on the socket as the start only from the instance's own processes", function()
    -- the app never binds its socket; a process of someone else's binds the
    -- path once the start has cleared it, and answers the health check
    local cfg = make_cfg(dir, { api = { 'health = "/health"', 'restart = "never"', "startup_timeout = 2",
      "[service.api.env]", 'BACKEND_NO_SOCKET = "1"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local sock = dir .. "/sock/api-x.sock"
      local stranger
      core.spawn(function()
        repeat core.sleep(5) until sup:get("api", "x") and sup:get("api", "x").pid
        stranger = assert(core.proc.spawn { argv = { BACKEND }, env = { "SOCKET_PATH=" .. sock },
          stdout = "null", stderr = "null", pdeathsig = "SIGKILL" })
      end)
      local inst, err = sup:spawn("api", "x")
      assert.is_nil(inst)
      assert.matches("did not answer GET /health", err, 1, true)
      assert.matches("something else bound the path", err, 1, true)
      assert.matches("pid " .. stranger.pid, err, 1, true)
      stranger:kill("SIGKILL")
      stranger:wait(5000)
      stranger:close()

      -- the app that binds its socket itself, or has a child bind it, is taken
      cfg = make_cfg(dir, { api = { 'health = "/health"' },
        wrapped = { string.format('command = "sh -c \'%s; true\'"', BACKEND), 'health = "/health"' } })
      sup = supervisor.new(cfg, { environ = {} })
      assert(sup:spawn("api", "y"))
      local w = assert(sup:spawn("wrapped", "z"))
      assert.are.equal(200, assert(get(w, "/health")).status)
      sup:shutdown()
    end)
  end)

  it("shows in a failed start's error the output of that start only", function()
    local mark = dir .. "/ran-once"
    local script = string.format("if [ -e %s ]; then exit 3; fi; touch %s; echo 'FOO is not set' >&2; exit 1",
      mark, mark)
    local cfg = make_cfg(dir, { flaky = { 'command = "/bin/sh"', string.format("args = [\"-c\", %q]", script),
      'restart = "never"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst, err = sup:spawn("flaky", "a")
      assert.is_nil(inst)
      assert.matches("exited with code 1", err, 1, true)
      assert.matches("stderr: FOO is not set", err, 1, true)
      -- the second run says nothing: the first one's words are not its own
      inst, err = sup:spawn("flaky", "a")
      assert.is_nil(inst)
      assert.matches("exited with code 3", err, 1, true)
      assert.is_nil(err:find("FOO is not set", 1, true), err)
      sup:shutdown()
    end)
  end)

  it("says that the app must listen on SOCKET_PATH when no socket ever appeared there", function()
    local cfg = make_cfg(dir, { quiet = { "startup_timeout = 1", "[service.quiet.env]", 'BACKEND_NO_SOCKET = "1"' } },
      { "max_restarts = 0" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err = sup:spawn("quiet", "a")
      assert.is_nil(inst)
      assert.matches("within startup_timeout = 1 s (no socket was ever made there: the app must listen on the Unix "
        .. "socket in $SOCKET_PATH, where requests and health checks go ($PORT gets none))", err, 1, true)
      sup:shutdown()
    end)
  end)

  it("says why it gave up on the first line, and the output that came before under it", function()
    local cfg = make_cfg(dir, { crash = { string.format("command = %q", "sh -c 'echo starting up; echo config missing >&2; exit 3'") } },
      { "max_restarts = 1" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err = sup:spawn("crash", "a")
      assert.is_nil(inst)
      local i = sup:get("crash", "a")
      assert.are.equal("crash:a did not start: " .. i.last_exit, err)
      err = i.last_exit
      local first, rest = err:match("^([^\n]*)\n(.*)$")
      assert.are.equal("exited with code 3 during startup; gave up: restarted 1 time within 300 s (max_restarts = 1)", first)
      assert.matches("stdout: starting up", rest, 1, true)
      assert.are.equal("stderr: config missing", rest:match("[^\n]*$"):gsub("^%s+", ""))
      -- a check now has nothing to ask, and says so
      local ok, why, code = sup:check("crash", "a")
      assert.is_nil(ok)
      assert.are.equal("not_running", code)
      assert.are.equal("crash:a is failed: " .. first .. ", so no check was made; `ten restart crash:a` starts it again", why)
      sup:shutdown()
    end)
  end)

  it("fails at once a start that no retry can mend, without spending the backoff", function()
    -- max_restarts = 3 with backoff: a start that went through the policy
    -- would show backoff states and restarts before failing
    local cfg = make_cfg(dir, {
      nouser = { 'user = "tenement-no-such-user"' },
      rootnproc = { "nproc = 50" },
      planned = { 'isolation = "firecracker"' },
      -- past what the kernel lets any process have: setrlimit's EPERM, at every try
      bignofile = { "nofile = " .. (require("tenement.runtime").nofile_max() + 1) },
      -- a deploy of a version not installed yet, a misspelt program
      nopath = { string.format("command = %q", dir .. "/v2/app") },
      noprog = { 'command = "tenement-no-such-program --port 1"' },
    }, { "max_restarts = 3" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local events = {}
      sup:on(function(e) events[#events + 1] = e end)
      for name, says in pairs { nouser = "tenement-no-such-user", rootnproc = "nproc = 50", planned = "firecracker",
        bignofile = "is more than this server can give (",
        nopath = "command: " .. dir .. "/v2/app is not there, or not executable",
        noprog = 'command: no program "tenement-no-such-program" on the app\'s PATH (' } do
        local inst, err = sup:spawn(name, "a")
        assert.is_nil(inst)
        assert.matches(says, err, 1, true)
        local i = sup:get(name, "a")
        assert.are.equal("failed", i.state)
        assert.are.equal(0, i.restarts)
        assert.matches("; not retried: no retry can mend this", i.last_exit, 1, true)
        assert.are.equal("starting failed", states_of(events, name .. ":a"))
        assert.is_nil(next(sup.ports))
      end
      sup:shutdown()
    end)
  end)

  it("restarts a crashing instance with backoff, then marks it failed", function()
    local cfg = make_cfg(dir, { crash = { "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { "max_restarts = 2" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local events = {}
      sup:on(function(e) events[#events + 1] = e end)
      local inst, err = sup:spawn("crash", "a")
      assert.is_nil(inst)
      assert.matches("exited with code 3", err, 1, true)
      local i = sup:get("crash", "a")
      assert.are.equal("failed", i.state)
      assert.are.equal("failed", i.health)
      assert.are.equal(2, i.restarts)
      assert.are.equal("starting backoff starting backoff starting failed",
        states_of(events, "crash:a"))
      assert.matches("gave up: restarted 2 times", i.last_exit, 1, true)
      -- restart clears failed and tries again
      local again = sup:restart("crash", "a")
      assert.is_nil(again)
      assert.are.equal("failed", i.state)
    end)
  end)

  it("restarts an instance that fails its health checks", function()
    local cfg = make_cfg(dir, { sick = { 'health = "/health"', "[service.sick.env]",
      'BACKEND_FAIL_HEALTH_AFTER = "2"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local events = {}
      sup:on(function(e) events[#events + 1] = e end)
      local inst = assert(sup:spawn("sick", "a"))
      local first_pid = inst.pid
      local deadline = core.now() + 15000
      while inst.restarts < 1 and core.now() < deadline do core.sleep(50) end
      assert.are.equal(1, inst.restarts)
      assert.are_not.equal(first_pid, inst.pid)
      assert.matches("running unhealthy backoff starting", states_of(events, "sick:a"), 1, true)
      assert.matches("health checks in a row", inst.reason or "", 1, true)
      sup:shutdown()
    end)
  end)

  -- the check's connection, kept open, went on answering while every
  -- request met ENOENT: another instance's root removed the socket file
  it("restarts an instance whose socket file was removed, which its kept check connection does not see", function()
    local cfg = make_cfg(dir, { api = { 'health = "/health"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "gone"))
      local first_pid, socket = inst.pid, inst.socket
      assert(core.fs.unlink(socket))
      local deadline = core.now() + 15000
      while inst.restarts < 1 and core.now() < deadline do core.sleep(50) end
      assert.are.equal(1, inst.restarts)
      assert.are_not.equal(first_pid, inst.pid)
      assert.matches("its socket " .. socket .. " was removed: requests cannot reach it", inst.reason or "", 1, true)
      deadline = core.now() + 5000
      while inst.state ~= "running" and core.now() < deadline do core.sleep(20) end
      assert.are.equal("socket", (core.fs.stat(inst.socket, false) or {}).type)
      sup:shutdown()
    end)
  end)

  it("sees an exit at once and restarts a killed instance", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "k"))
      assert.are.equal("healthy", inst.health)
      -- while it backs off there is no process, and no health to speak of
      local health_in_backoff
      sup:on(function(e) if e.to == "backoff" then health_in_backoff = inst.health end end)
      local pid = inst.pid
      core.proc.kill(pid, "SIGKILL")
      local deadline = core.now() + 5000
      while (inst.pid == pid or inst.state ~= "running") and core.now() < deadline do core.sleep(5) end
      assert.are.equal("running", inst.state)
      assert.are_not.equal(pid, inst.pid)
      assert.matches("killed by SIGKILL", inst.last_exit, 1, true)
      assert.are.equal("unknown", health_in_backoff)
      sup:shutdown()
    end)
  end)

  it("stops with SIGTERM, then SIGKILL after stop_timeout; removes socket and data", function()
    local cfg = make_cfg(dir, { stubborn = { "[service.stubborn.env]", 'BACKEND_IGNORE_TERM = "1"' },
      keep = { "storage_persist = true" } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("stubborn", "a"))
      local socket, pid = inst.socket, inst.pid
      local t0 = core.now()
      assert.is_true(sup:stop("stubborn", "a"))
      assert.is_true(core.now() - t0 >= 900)
      assert.are.equal("stopped", inst.state)
      assert.matches("SIGKILL", inst.last_exit, 1, true)
      assert.is_false(exists(socket))
      assert.is_false(exists(dir .. "/data/stubborn/a"))
      assert.is_false(exists("/proc/" .. pid .. "/status"))

      local keep = assert(sup:spawn("keep", "a"))
      support.write(dir .. "/data/keep/a/state.txt", "kept")
      assert.is_true(sup:stop("keep", "a"))
      assert.is_true(exists(dir .. "/data/keep/a/state.txt"))
      assert.are.equal("stopped", keep.state)
      -- and it comes back with its data
      assert(sup:spawn("keep", "a"))
      assert.is_true(exists(dir .. "/data/keep/a/state.txt"))
      sup:shutdown()
    end)
  end)

  it("kills the whole process group on stop (no grandchild survives)", function()
    local cfg = make_cfg(dir, { tree = { string.format("command = %q",
      "sleep 300 & exec " .. BACKEND) } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("tree", "a"))
      local pgid = inst.pid
      sup:stop("tree", "a")
      core.sleep(50)
      assert.are.same({}, support.live_in_group(pgid))
    end)
  end)

  it("captures stdout and stderr lines into the instance's ring", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "logs"))
      assert(get(inst, "/flood?lines=50"))
      local deadline = core.now() + 2000
      while core.now() < deadline do
        local n = 0
        for _, l in ipairs(inst.ring:lines(0)) do if l.stream == "stdout" then n = n + 1 end end
        if n >= 51 then break end
        core.sleep(10)
      end
      local lines = inst.ring:lines(0)
      assert.matches("listening on", lines[1].text, 1, true)
      assert.is_true(#lines >= 51)
      sup:shutdown()
    end)
  end)

  it("starts 200 instances at once", function()
    local cfg = make_cfg(dir, { many = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = core.spawn(function() return sup:spawn("many", "i" .. i) end)
      end
      local most_waiting, done = 0, false
      local sampler = core.spawn(function()
        while not done do
          local w = sup.socket_watches[dir .. "/sock"]
          most_waiting = math.max(most_waiting, w and w.users or 0)
          coroutine.yield()
        end
      end)
      local ports = {}
      for i = 1, 200 do
        local ok, inst = tasks[i]:join()
        assert.is_true(ok)
        assert.is_truthy(inst, "many:i" .. i .. " did not start")
        assert.are.equal("running", inst.state)
        assert.is_nil(ports[inst.port], "port given twice")
        ports[inst.port] = true
      end
      assert.are.equal(200, #sup:list())
      done = true
      sampler:join()
      -- they waited for their sockets on one watch of the directory, and let it go
      assert.is_true(most_waiting > 1, "starts waiting on the watch at once: " .. most_waiting)
      assert.is_nil(next(sup.socket_watches))
      sup:shutdown()
      for _, s in ipairs(sup:list()) do assert.are.equal("stopped", s.state) end
    end)
  end)

  it("lists snapshots a script can encode", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      assert(sup:spawn("api", "a"))
      local list = sup:list()
      assert.are.equal(1, #list)
      assert.are.equal("api:a", list[1].instance)
      assert.are.equal("running", list[1].state)
      assert.is_number(list[1].pid)
      assert.is_string(json.encode(list))
      sup:shutdown()
    end)
  end)
end)

describe("supervisor limits and walls", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  local function is_root()
    local p = io.popen("id -u")
    local uid = p:read("n")
    p:close()
    return uid == 0
  end

  it("reports an OOM kill as such and restarts the instance", function()
    if not is_root() then pending("cgroup limits need root") return end
    local cfg = make_cfg(dir, { hog = { "memory_limit_mb = 64" } }, { "max_restarts = 5" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("hog", "a"))
      local pid = inst.pid
      -- /leak makes the backend allocate and touch past its limit
      core.http.request { path = inst.socket, target = "/leak?mb=200", timeout = 5000 }
      local deadline = core.now() + 10000
      while (inst.pid == pid or inst.state ~= "running") and core.now() < deadline do core.sleep(20) end
      assert.are_not.equal(pid, inst.pid)
      assert.matches("killed: out of memory, limit 64 MB", inst.last_exit, 1, true)
      -- the restart runs in the same cgroups: their count of OOM kills has
      -- the last one, and a plain SIGKILL now is not taken for another
      pid = inst.pid
      core.proc.kill(pid, "SIGKILL")
      deadline = core.now() + 10000
      while (inst.pid == pid or inst.state ~= "running") and core.now() < deadline do core.sleep(20) end
      assert.are.equal("killed by SIGKILL", inst.last_exit)
      sup:shutdown()
    end)
  end)

  it("keeps an instance's cgroups for its next start; a stop, other limits or the shutdown remove them", function()
    if not is_root() then pending("cgroup limits need root") return end
    local cfg = make_cfg(dir, { w = { "pids_limit = 50" } })
    local function procs(d)
      local f = assert(io.open(d .. "/cgroup.procs"))
      local t = f:read("a")
      f:close()
      return t
    end
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("w", "a"))
      local dirs = inst.cg:dirs()
      assert.is_true(#dirs > 0)
      -- asleep: they stay, empty
      assert.is_true(sup:sleep("w", "a"))
      for _, d in ipairs(dirs) do assert.are.equal("", procs(d)) end
      -- woken: the same ones, the process in them
      assert(sup:spawn("w", "a"))
      assert.are.same(dirs, inst.cg:dirs())
      for _, d in ipairs(dirs) do assert.matches(tostring(inst.pid), procs(d)) end
      -- a crash and its restart: the same again
      local pid = inst.pid
      get(inst, "/crash")
      local deadline = core.now() + 10000
      while (inst.pid == pid or inst.state ~= "running") and core.now() < deadline do core.sleep(20) end
      assert.are.same(dirs, inst.cg:dirs())
      -- other limits by the next start: new ones, the old ones gone
      assert.is_true(sup:sleep("w", "a"))
      assert(sup:rollout("w", make_cfg(dir, { w = { "pids_limit = 60" } }).services.w))
      assert(sup:spawn("w", "a"))
      local again = inst.cg:dirs()
      for i, d in ipairs(dirs) do
        assert.are_not.equal(d, again[i])
        assert.is_nil(core.fs.stat(d))
      end
      -- a stop removes them
      assert.is_true(sup:stop("w", "a"))
      for _, d in ipairs(again) do assert.is_nil(core.fs.stat(d)) end
      -- and so does the shutdown, for an instance asleep
      assert(sup:spawn("w", "b"))
      local b_dirs = sup:get("w", "b").cg:dirs()
      assert.is_true(sup:sleep("w", "b"))
      assert.is_truthy(core.fs.stat(b_dirs[1]))
      sup:shutdown()
      for _, d in ipairs(b_dirs) do assert.is_nil(core.fs.stat(d)) end
      -- and the bases it made for them (a server's keeper removes its own)
      for _, base in ipairs(require("tenement.cgroup").bases(sup.cgroups)) do assert.is_nil(core.fs.stat(base)) end
    end)
  end)

  it("runs a service as its user: its own files, no one else's", function()
    if not is_root() then pending("switching users needs root") return end
    -- the test's own directory must be open for nobody to reach the sockets
    os.execute("chmod 755 " .. support.quote(dir))
    local cfg = make_cfg(dir, {
      mine = { 'user = "nobody"' },
      other = {},
    })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local other = assert(sup:spawn("other", "x"))
      support.write(dir .. "/data/other/x/secret.txt", "secret")
      local mine = assert(sup:spawn("mine", "y"))
      -- the process runs as nobody
      local f = io.open("/proc/" .. mine.pid .. "/status")
      local status = f:read("a")
      f:close()
      assert.matches("\nUid:%s+65534", status)
      assert.matches("\nGroups:%s*\n", status)
      assert.matches("\nNoNewPrivs:%s+1", status)
      -- its own directory is its own; another instance's is closed to it
      local st = core.fs.stat(dir .. "/data/mine/y")
      assert.are.equal(65534, st.uid)
      local code = support.run("setpriv --reuid=65534 --regid=65534 --clear-groups cat "
        .. dir .. "/data/other/x/secret.txt")
      assert.are_not.equal(0, code)
      assert.are.equal("running", other.state)
      sup:shutdown()
    end)
  end)

  it("starts again in new cgroups after its old ones had to be killed whole", function()
    if not is_root() then pending("cgroup limits need root") return end
    -- the app leaves a process outside its group: only the cgroup finds it
    local cfg = make_cfg(dir, { tree = { "pids_limit = 50",
      string.format("command = %q", "setsid sleep 300 & exec " .. BACKEND) } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("tree", "a"))
      local pid = inst.pid
      get(inst, "/crash")
      local deadline = core.now() + 10000
      while (inst.pid == pid or inst.state ~= "running") and core.now() < deadline do core.sleep(20) end
      -- a cgroup2 group killed through cgroup.kill is not used again: on
      -- some kernels every child born into it is killed at birth
      assert.are.equal("running", inst.state, inst.last_exit)
      assert(get(inst, "/health"))
      for _, d in ipairs(inst.cg:dirs()) do
        local f = assert(io.open(d .. "/cgroup.procs"))
        assert.are.equal(tostring(inst.pid), f:read("l"))
        f:close()
      end
      sup:shutdown()
    end)
  end)

  it("writes the CPU weight and the pids limit into the instance's cgroups", function()
    if not is_root() then pending("cgroup limits need root") return end
    local cfg = make_cfg(dir, { w = { "cpu_shares = 400", "pids_limit = 50" } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("w", "a"))
      local found_cpu, found_pids = false, false
      for _, d in ipairs(inst.cg:dirs()) do
        local function read(name)
          local f = io.open(d .. "/" .. name)
          if not f then return nil end
          local v = f:read("l")
          f:close()
          return v
        end
        local shares, weight, pids = read("cpu.shares"), read("cpu.weight"), read("pids.max")
        if shares then assert.are.equal("4096", shares) found_cpu = true end
        if weight then assert.are.equal("400", weight) found_cpu = true end
        if pids then assert.are.equal("50", pids) found_pids = true end
      end
      assert.is_true(found_cpu)
      assert.is_true(found_pids)
      sup:shutdown()
    end)
  end)

  it("enforces storage_quota_mb: writing past it fails with ENOSPC, and the server keeps running", function()
    if not is_root() then pending("loop mounts need root") return end
    local cfg = make_cfg(dir, { q = { "storage_quota_mb = 8", "storage_persist = true" } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("q", "a"))
      local code, _, err = support.run("dd if=/dev/zero of=" .. inst.dir .. "/fill bs=1M count=20")
      assert.are_not.equal(0, code)
      assert.matches("No space left on device", err, 1, true)
      assert.are.equal("running", inst.state)
      assert(core.http.request { path = inst.socket, target = "/health", timeout = 2000 })
      sup:stop("q", "a")
      -- persisted: the data is there at the next start
      inst = assert(sup:spawn("q", "a"))
      assert.is_truthy(core.fs.stat(inst.dir .. "/fill"))
      sup:shutdown()
    end)
  end)
end)

describe("periodic health checks", function()
  after_each(support.cleanup)

  it("reuse one connection between checks, and replace it when it goes away", function()
    local dir = support.tmpdir()
    local cfg = make_cfg(dir, { api = { 'health = "/health"' } })
    core.run(function()
      local path = dir .. "/h.sock"
      local status = 200
      local listener = assert(core.net.listen { path = path })
      local server = core.http.serve(listener, function(req)
        assert.are.equal("/health", req.path)
        return status, {}, "ok"
      end)
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = sup:instance("api", "k")
      inst.socket = path
      local keep = {}
      for _ = 1, 5 do assert.is_true((inst:check_kept(keep, 2000))) end
      assert.are.equal(1, server:stats().connections_accepted)
      assert.are.equal(5, server:stats().requests)
      -- a failing answer is a failed check, on the same connection
      status = 503
      local ok, why = inst:check_kept(keep, 2000)
      assert.is_nil(ok)
      assert.matches("answered 503", why, 1, true)
      assert.are.equal(1, server:stats().connections_accepted)
      -- the server drops its connections: the next check opens a new one
      status = 200
      server:close()
      listener:close()
      core.sleep(20)
      listener = assert(core.net.listen { path = path })
      server = core.http.serve(listener, function() return 200, {}, "ok" end)
      assert.is_true((inst:check_kept(keep, 2000)))
      assert.are.equal(1, server:stats().connections_accepted)
      keep.conn:close()
      server:close()
      listener:close()
    end)
  end)

  -- A server written here answers each request with the next canned
  -- response, byte for byte: header names in any case, bodies by length,
  -- chunked or up to the close.
  it("read the answer's framing whatever the case of its header names", function()
    local dir = support.tmpdir()
    local cfg = make_cfg(dir, { api = { 'health = "/health"' } })
    core.run(function()
      local path = dir .. "/raw.sock"
      local listener = assert(core.net.listen { path = path })
      local answers, accepted = {}, 0
      core.spawn(function()
        while true do
          local ok, s = pcall(listener.accept, listener)
          if not ok or not s then return end
          accepted = accepted + 1
          core.spawn(function()
            local buf = ""
            while true do
              local chunk = s:read()
              if not chunk then break end
              buf = buf .. chunk
              local req_end = buf:find("\r\n\r\n", 1, true)
              if req_end then
                assert.matches("^GET /health HTTP/1.1\r\n", buf)
                buf = buf:sub(req_end + 4)
                local answer = table.remove(answers, 1)
                s:write(answer.bytes)
                if answer.close then break end
              end
            end
            s:close()
          end)
        end
      end)
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = sup:instance("api", "k")
      inst.socket = path
      local keep = {}
      local function check(bytes, close)
        answers[#answers + 1] = { bytes = bytes, close = close }
        return inst:check_kept(keep, 2000)
      end
      assert.is_true(check("HTTP/1.1 200 OK\r\nCONTENT-LENGTH: 2\r\n\r\nok"))
      -- no body, no length
      assert.is_true(check("HTTP/1.1 204 No Content\r\ncontent-type: text/plain\r\n\r\n"))
      assert.is_true(check("HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"))
      local ok, why = check("HTTP/1.1 503 Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
      assert.is_nil(ok)
      assert.matches("answered 503", why, 1, true)
      assert.are.equal(1, accepted)
      -- a connection the server closes is not used again
      assert.is_true(check("HTTP/1.1 200 OK\r\nConnection: CLOSE\r\nContent-Length: 2\r\n\r\nok", true))
      assert.is_nil(keep.conn)
      assert.is_true(check("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"))
      assert.are.equal(2, accepted)
      -- a body that ends with the connection cannot be followed by another answer
      assert.is_true(check("HTTP/1.1 200 OK\r\n\r\nok", true))
      assert.is_nil(keep.conn)
      listener:close()
    end)
  end)

  -- The app here is a process that answers nothing itself; the spec serves
  -- its socket, to count connections and requests.
  it("probe readiness and check health over one connection for the process's life", function()
    local dir = support.tmpdir()
    local cfg = make_cfg(dir, { api = { 'health = "/health"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("api", "k"))
      assert.are.equal("running", inst.state)
      -- health_check_interval = 1: the probe, then two checks, all on the
      -- one connection (each of this spec's questions comes on one more)
      local deadline, stats, asked = core.now() + 10000, nil, 0
      repeat
        core.sleep(100)
        stats, asked = assert(get(inst, "/stats")).body, asked + 1
      until tonumber(stats:match("health (%d+)")) >= 3 or core.now() > deadline
      assert.is_true(tonumber(stats:match("health (%d+)")) >= 3, stats)
      assert.are.equal(1 + asked, tonumber(stats:match("connections (%d+)")), stats)
      assert.are.equal("healthy", inst.health)
      sup:shutdown()
    end)
  end)
end)

describe("supervisor stops, sleeps and restarts", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  local function wait_for(cond, ms)
    local deadline = core.now() + (ms or 10000)
    while not cond() and core.now() < deadline do core.sleep(10) end
    return cond()
  end

  it("keeps the instance's data across `ten restart`, running or failed", function()
    local cfg = make_cfg(dir, { api = {}, crash = { "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { "max_restarts = 0" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      assert(sup:spawn("api", "a"))
      support.write(dir .. "/data/api/a/state.db", "precious")
      assert(sup:restart("api", "a"))
      assert.is_true(exists(dir .. "/data/api/a/state.db"))
      assert.are.equal("running", sup:get("api", "a").state)

      assert.is_nil(sup:spawn("crash", "a"))
      assert.are.equal("failed", sup:get("crash", "a").state)
      support.write(dir .. "/data/crash/a/state.db", "precious")
      assert.is_nil(sup:restart("crash", "a"))
      assert.is_true(exists(dir .. "/data/crash/a/state.db"))
      -- a stop is still a stop: the data goes
      assert.is_true(sup:stop("api", "a"))
      assert.is_false(exists(dir .. "/data/api/a/state.db"))
      sup:shutdown()
    end)
  end)

  it("puts a starting instance to sleep instead of wedging it in starting", function()
    local cfg = make_cfg(dir, { slow = { "startup_timeout = 10", "[service.slow.env]",
      'BACKEND_START_DELAY_MS = "1500"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("slow", "a", { wait = false }))
      assert.are.equal("starting", inst.state)
      assert.is_true(sup:sleep("slow", "a"))
      assert.are.equal("sleeping", inst.state)
      assert.is_nil(inst.runner)
      -- and a request wakes it as any sleeping one
      assert(sup:spawn("slow", "a"))
      assert.are.equal("running", inst.state)
      assert.is_true(sup:stop("slow", "a"))
      assert.are.equal("stopped", inst.state)
    end)
  end)

  it("puts an instance backing off to sleep, keeping its data", function()
    local cfg = make_cfg(dir, { crash = { "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } })
    cfg.settings.backoff_base_ms, cfg.settings.backoff_max_ms = 5000, 5000
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("crash", "a", { wait = false }))
      assert.is_true(wait_for(function() return inst.state == "backoff" end))
      support.write(dir .. "/data/crash/a/state.db", "precious")
      assert.is_true(sup:sleep("crash", "a"))
      assert.are.equal("sleeping", inst.state)
      assert.is_true(exists(dir .. "/data/crash/a/state.db"))
      sup:shutdown()
    end)
  end)

  it("has a spawn of an instance restarting after a crash wait for the restart", function()
    local cfg = make_cfg(dir, { api = {} })
    cfg.settings.backoff_base_ms, cfg.settings.backoff_max_ms = 300, 300
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a"))
      local pid = inst.pid
      get(inst, "/crash")
      assert.is_true(wait_for(function() return inst.state == "backoff" end))
      -- its ready event is the life that crashed: the spawn must not take
      -- it for this one and return an instance nobody listens for
      assert.are.equal(inst, sup:spawn("api", "a"))
      assert.are.equal("running", inst.state)
      assert.are_not.equal(pid, inst.pid)
      assert.are.equal(200, get(inst, "/health").status)
      sup:shutdown()
    end)
  end)

  it("refuses a sleep when a request came after the asker judged the instance idle", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a"))
      -- the instance's own upstream, behind a real server, as the door uses it
      local l = assert(core.net.listen { port = 0 })
      local srv = core.http.serve(l, function(req)
        local st, err, code = req:proxy(inst:upstream())
        if not st then return nil, err, code end
      end, { lazy_body = true })
      local function through(target)
        return assert(core.http.request { host = "127.0.0.1", port = l:port(), target = target, timeout = 5000 })
      end
      -- the reaper saw it idle; a request came and went before the runner
      -- took the sleep: its client may come back at once
      local seen = inst:last_active()
      core.sleep(5)
      assert.are.equal(200, through("/").status)
      local ok, why = sup:sleep("api", "a", "idle", seen)
      assert.is_nil(ok)
      assert.are.equal("busy: a request came since", why)
      assert.are.equal("running", inst.state)
      -- one in flight when the runner takes the sleep is refused too
      local slow = core.spawn(through, "/sleep?ms=300")
      assert.is_true(wait_for(function() return inst:inflight() == 1 end))
      ok, why = sup:sleep("api", "a", "idle", inst:last_active())
      assert.are.equal("busy: a request is in flight", why)
      local done, res = slow:join(5000)
      assert.is_true(done)
      assert.are.equal(200, res.status)
      -- idle since what the asker saw: it sleeps
      assert.is_true(sup:sleep("api", "a", "idle", inst:last_active()))
      assert.are.equal("sleeping", inst.state)
      srv:close()
      sup:shutdown()
    end)
  end)

  it("answers a sleep asked while a stop is under way", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a"))
      -- the reaper's sleep comes in behind an operator's stop: the runner
      -- takes the stop and ends without taking the sleep
      local stopper = core.spawn(sup.stop, sup, "api", "a")
      local sleeper = core.spawn(sup.sleep, sup, "api", "a", "idle", inst:last_active())
      local done, ok = stopper:join(10000)
      assert.is_true(done)
      assert.is_true(ok)
      assert.are.equal("stopped", inst.state)
      local answered, slept, why = sleeper:join(5000)
      assert.is_true(answered)
      assert.is_nil(slept)
      assert.are.equal("not running", why)
      sup:shutdown()
    end)
  end)

  it("kills what a crashed app left in its process group before starting it again", function()
    local cfg = make_cfg(dir, { tree = { string.format("command = %q", "sleep 300 & exec " .. BACKEND) } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("tree", "a"))
      local pgid = inst.pid
      assert.are.equal(2, #support.live_in_group(pgid))
      get(inst, "/crash")
      assert.is_true(wait_for(function() return inst.pid ~= pgid and inst.state == "running" end))
      assert.are.same({}, support.live_in_group(pgid))
      sup:shutdown()
    end)
  end)

  it("answers a rollout that reaches an instance while it is being restarted", function()
    local sick = { 'health = "/health"', "[service.api.env]", 'BACKEND_FAIL_HEALTH_AFTER = "2"',
      'BACKEND_IGNORE_TERM = "1"' }
    local cfg = make_cfg(dir, { api = sick })
    local new_svc = make_cfg(dir, { api = { 'health = "/health"', "[service.api.env]", 'VERSION = "2"' } })
      .services.api
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a"))
      local rollout
      sup:on(function(e)
        -- the runner now ends the unhealthy process (which ignores SIGTERM)
        -- and then backs off: the rollout's request waits in its mailbox
        if e.instance == "api:a" and e.to == "unhealthy" and not rollout then
          rollout = core.spawn(sup.rollout, sup, "api", new_svc)
        end
      end)
      assert.is_true(wait_for(function() return rollout ~= nil end, 15000))
      local finished = rollout:join(10000)
      assert.is_true(finished, "the rollout never finished")
      assert.is_nil(sup.rolling.api)
      assert.is_true(wait_for(function() return inst.state == "running" and inst.svc == new_svc end))
      assert.matches("VERSION=2", assert(get(inst, "/env")).body, 1, true)
      sup:shutdown()
    end)
  end)

  it("starts an app whose health check answers slower than a second", function()
    local cfg = make_cfg(dir, { slow = { 'health = "/sleep?ms=1500"', "startup_timeout = 10" } })
    cfg.settings.health_check_interval = 5
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst, err = sup:spawn("slow", "a")
      assert.is_truthy(inst, err)
      assert.are.equal("running", inst.state)
      assert.are.equal(0, inst.restarts)
      sup:shutdown()
    end)
  end)

  it("stops an instance that a sleep under way was taking down", function()
    local cfg = make_cfg(dir, { stubborn = { "[service.stubborn.env]", 'BACKEND_IGNORE_TERM = "1"' } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("stubborn", "a"))
      local sleeping = core.spawn(sup.sleep, sup, "stubborn", "a", "idle")
      assert.is_true(wait_for(function() return inst.state == "stopping" end))
      assert.is_true(sup:stop("stubborn", "a"))
      sleeping:join()
      assert.are.equal("stopped", inst.state)
      assert.is_false(exists(dir .. "/data/stubborn/a"))
      sup:shutdown()
    end)
  end)

  it("quotes in a failed rollout only what the new process wrote, not the old one serving beside it", function()
    local cfg = make_cfg(dir, { api = { "startup_timeout = 1", 'health = "/health"' } })
    local new_svc = make_cfg(dir, { api = { "startup_timeout = 1", 'health = "/health"', "[service.api.env]",
      'BACKEND_HEALTH_STATUS = "503"' } }).services.api
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a"))
      local old_socket = inst.socket
      local rolling = core.spawn(sup.rollout, sup, "api", new_svc)
      -- the old process goes on serving, and writing, while the new one starts
      core.sleep(300)
      assert(core.http.request { path = old_socket, target = "/flood?lines=12", timeout = 2000 })
      local _, n, err = rolling:join()
      assert.is_nil(n)
      assert.matches("GET /health with 2xx[^\n]*; the old version keeps serving\nlast output:\n", err)
      local quoted = err:match("\nlast output:\n(.*)$")
      assert.is_string(quoted, err)
      assert.is_nil(quoted:find("flood", 1, true), err)
      assert.matches("listening on", quoted, 1, true)
      assert.are.equal("running", inst.state)
      sup:shutdown()
    end)
  end)

  it("rolls out to an instance that was starting, instead of leaving it on the old definition", function()
    local cfg = make_cfg(dir, { api = { "startup_timeout = 10", "[service.api.env]", 'BACKEND_START_DELAY_MS = "1000"' } })
    local new_svc = make_cfg(dir, { api = { "[service.api.env]", 'VERSION = "2"' } }).services.api
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:spawn("api", "a", { wait = false }))
      assert.is_true(wait_for(function() return inst.pid ~= nil end))
      assert.are.equal("starting", inst.state)
      assert(sup:rollout("api", new_svc))
      assert.is_true(wait_for(function() return inst.state == "running" end))
      assert.are.equal(new_svc, inst.svc)
      assert.matches("VERSION=2", assert(get(inst, "/env")).body, 1, true)
      sup:shutdown()
    end)
  end)

  it("refuses a rollout that lowers the storage quota of an instance holding data, and takes one that raises it",
    function()
    local p = io.popen("id -u")
    local uid = p:read("n")
    p:close()
    if uid ~= 0 then pending("loop mounts need root") return end
    local cfg = make_cfg(dir, { q = { "storage_quota_mb = 16" } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("q", "a"))
      local lower = make_cfg(dir, { q = { "storage_quota_mb = 8" } }).services.q
      local n, err, code = sup:rollout("q", lower)
      assert.is_nil(n)
      assert.are.equal("conflict", code)
      assert.matches("storage_quota_mb of q cannot be lowered from 16 to 8 MB: " .. dir .. "/data/q/a.img holds a "
        .. "file system of 16 MB, and shrinking one is not supported", err, 1, true)
      -- nothing changed: the old definition serves on
      assert.are.equal(16, sup.cfg.services.q.storage_quota_mb)
      assert.are.equal(16, inst.svc.storage_quota_mb)
      assert.are.equal("running", inst.state)
      local higher = make_cfg(dir, { q = { "storage_quota_mb = 24" } }).services.q
      assert.are.equal(1, assert(sup:rollout("q", higher)))
      assert.are.equal(24, inst.svc.storage_quota_mb)
      sup:shutdown()
    end)
  end)

  it("starts again at once an instance whose stop is still unmounting its storage", function()
    local p = io.popen("id -u")
    local uid = p:read("n")
    p:close()
    if uid ~= 0 then pending("loop mounts need root") return end
    local cfg = make_cfg(dir, { q = { "storage_quota_mb = 8" } })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = { PATH = "/usr/bin:/bin" } })
      local inst = assert(sup:spawn("q", "a"))
      local stopping = core.spawn(sup.stop, sup, "q", "a")
      -- a wake that comes as soon as the state says stopped
      assert.are.equal("stopped", inst:wait_state({ stopped = true }, 10000))
      local again, err = sup:spawn("q", "a")
      stopping:join()
      assert.is_truthy(again, err)
      assert.are.equal("running", inst.state)
      assert.is_not_nil(inst.runner)
      assert.is_truthy(core.fs.stat(inst.dir))
      assert(get(inst, "/health"))
      -- and it can still be stopped
      assert.is_true(sup:stop("q", "a"))
      assert.are.equal("stopped", inst.state)
      sup:shutdown()
    end)
  end)

  it("gives a failed instance that `ten restart` starts again its full restart budget, and counts every restart", function()
    local cfg = make_cfg(dir, { crash = { "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { "max_restarts = 2" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local events = {}
      sup:on(function(e) events[#events + 1] = e end)
      assert.is_nil(sup:spawn("crash", "a"))
      local inst = sup:get("crash", "a")
      assert.are.equal("failed", inst.state)
      assert.are.equal(2, inst.restarts)
      events = {}
      assert.is_nil(sup:restart("crash", "a"))
      assert.are.equal("failed", inst.state)
      -- the same tries as the first time, each one counted, plus the restart
      assert.are.equal("stopping stopped starting backoff starting backoff starting failed",
        states_of(events, "crash:a"))
      assert.are.equal(5, inst.restarts)
    end)
  end)

  -- LAST EXIT of a running instance said "gave up", which reads as its state
  it("keeps the exit but drops the verdict on it once a start brings a failed instance back", function()
    local flag = dir .. "/fixed"
    local cfg = make_cfg(dir, { flaky = { string.format("command = %q", string.format(
      "sh -c 'test -e %s || exit 3; exec %s'", flag, BACKEND)) } }, { "max_restarts = 0" })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      assert.is_nil(sup:spawn("flaky", "a"))
      local inst = sup:get("flaky", "a")
      assert.are.equal("failed", inst.state)
      assert.matches("exited with code 3 during startup; gave up", inst.last_exit, 1, true)
      support.write(flag, "")
      assert(sup:restart("flaky", "a"))
      assert.are.equal("running", inst.state)
      assert.matches("^exited with code 3 during startup", inst.last_exit)
      assert.is_nil(inst.last_exit:find("gave up", 1, true), inst.last_exit)
      sup:shutdown()
    end)
  end)

  it("shows no LAST EXIT for an instance restored asleep once it runs: it had no exit of its own", function()
    local cfg = make_cfg(dir, { api = {} })
    core.run(function()
      local sup = supervisor.new(cfg, { environ = {} })
      local inst = assert(sup:remember_asleep("api", "z"))
      assert.are.equal("asleep (restored after a restart of the server)", inst.last_exit)
      assert(sup:spawn("api", "z"))
      assert.are.equal("running", inst.state)
      assert.is_nil(inst.last_exit)
      sup:shutdown()
    end)
  end)

  it("falls back to the built-in restart policy when a replacement answers nonsense", function()
    local cfg = make_cfg(dir, { crash = { "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { "max_restarts = 1" })
    for _, answer in ipairs { { action = "restart" }, { action = "restart", delay_ms = "soon" }, { action = "explode" },
      { action = "fail" } } do
      core.run(function()
        local sup = supervisor.new(cfg, { environ = {}, restart_policy = function() return answer end })
        local inst, err = sup:spawn("crash", "a")
        assert.is_nil(inst)
        assert.matches("gave up", err, 1, true)
        assert.are.equal("failed", sup:get("crash", "a").state)
        assert.is_nil(sup:get("crash", "a").runner)
      end)
    end
  end)
end)
