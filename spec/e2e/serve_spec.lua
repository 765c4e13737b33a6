-- A real `ten serve` driven by the real CLI: the supervisor as an operator
-- meets it.
local support = require "support"
local _ -- a place for values a spec does not look at
local cjson = require "cjson"

local BACKEND = support.fixture("backend")
local FORKN = support.fixture("forkn")
local URGENT = support.fixture("urgent")

local sleep = support.sleep

-- %d: a pid read from JSON is a float (cjson), and "/proc/123.0" is nobody,
-- which made every "is it gone" check pass
local function pid_alive(pid)
  local f = io.open(string.format("/proc/%d/stat", pid))
  if not f then return false end
  local stat = f:read("a")
  f:close()
  return stat:match("%) (%S)") ~= "Z"
end

local function ten(cfg_path, ...)
  local args = { "--config", cfg_path, ... }
  return support.ten_run(args)
end

-- Waits until `ten ps` answers (the server is up).
local function wait_up(cfg_path)
  for _ = 1, 100 do
    local code = ten(cfg_path, "ps")
    if code == 0 then return true end
    sleep(0.05)
  end
  return false
end

local function ps(cfg_path)
  local code, out, err = ten(cfg_path, "ps", "--json")
  assert(code == 0, err)
  local by = {}
  for _, i in ipairs(cjson.decode(out)) do by[i.id] = i end
  return by
end

describe("ten serve", function()
  local dir, cfg, log, pid, port

  before_each(function()
    dir = support.tmpdir()
    cfg = dir .. "/tenement.toml"
    log = dir .. "/serve.log"
    port = support.free_port()
    support.write(cfg, table.concat({
      "[settings]",
      'data_dir = "data"',
      "port = " .. port,
      "health_check_interval = 1",
      "backoff_base_ms = 50",
      "stop_timeout = 2",
      "[service.api]",
      string.format("command = %q", BACKEND),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
      'health = "/health"',
      'isolation = "process"',
      -- one that may sleep: a restart of the server brings it back asleep
      "[service.sleepy]",
      string.format("command = %q", BACKEND),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
      'isolation = "process"',
      "idle_timeout = 300",
      -- an app that only SIGKILL stops
      "[service.stubborn]",
      string.format("command = %q", BACKEND),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
      'isolation = "process"',
      "[service.stubborn.env]", 'BACKEND_IGNORE_TERM = "1"',
      -- an app that leaves three processes of its own behind it
      "[service.forky]",
      string.format("command = %q", string.format("sh -c '%s 3 %s & exec %s'", FORKN, dir, BACKEND)),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
      'isolation = "process"',
      "[instances]",
      'api = ["boot"]',
    }, "\n") .. "\n")
    pid = support.ten_serve(cfg, log)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
  end)

  after_each(function()
    if pid and pid_alive(pid) then os.execute("kill -KILL " .. pid) end
    support.cleanup()
  end)

  it("starts [instances], spawns, lists, checks, stops and restarts through the CLI", function()
    local by = ps(cfg)
    assert.are.equal("running", by["api:boot"].state)

    local code, out, err = ten(cfg, "spawn", "api", "--id", "two")
    assert.are.equal(0, code, err)
    assert.matches("api:two is running", out, 1, true)
    code = ten(cfg, "spawn", "api:three")
    assert.are.equal(0, code)

    code, out = ten(cfg, "ps")
    assert.are.equal(0, code)
    assert.matches("INSTANCE%s+STATE%s+HEALTH", out)
    assert.matches("api:two%s+running%s+healthy", out)

    code, out = ten(cfg, "health", "api:two")
    assert.are.equal(0, code)
    assert.matches("api:two: healthy", out, 1, true)
    -- a check that fails now is said as such, whatever the periodic ones kept
    local three = ps(cfg)["api:three"]
    os.remove(three.socket)
    code, out = ten(cfg, "health", "api:three")
    assert.are.equal(1, code)
    assert.matches("^api:three: the check failed: .*ENOENT.* %(the periodic checks say: %a+%)\n$", out)

    code, _, err = ten(cfg, "spawn", "nope:x")
    assert.are.equal(1, code)
    assert.matches('no service "nope"', err, 1, true)

    local two_pid = ps(cfg)["api:two"].pid
    code, out = ten(cfg, "restart", "api:two")
    assert.are.equal(0, code)
    assert.matches("api:two is running", out, 1, true)
    by = ps(cfg)
    assert.are_not.equal(two_pid, by["api:two"].pid)
    assert.are.equal(1, by["api:two"].restarts)

    code, out = ten(cfg, "stop", "api:three")
    assert.are.equal(0, code)
    assert.matches("^api:three stopped: [^\n]+\n$", out)
    assert.are.equal("stopped", ps(cfg)["api:three"].state)
    -- a stop is idempotent, and says so
    code, out = ten(cfg, "stop", "api:three")
    assert.are.equal(0, code)
    assert.are.equal("api:three was already stopped\n", out)
    -- the operator learns that the stop took force
    assert.are.equal(0, (ten(cfg, "spawn", "stubborn:x")))
    code, out = ten(cfg, "stop", "stubborn:x")
    assert.are.equal(0, code)
    assert.are.equal("stubborn:x stopped: killed by SIGKILL: it had not stopped 2 s after SIGTERM (stop_timeout)\n",
      out)
    code, out = ten(cfg, "health", "api:three")
    assert.are.equal(1, code)
    assert.are.equal("api:three is stopped, so no check was made; `ten spawn api:three` starts it\n", out)

    code, _, err = ten(cfg, "stop", "api:never")
    assert.are.equal(1, code)
    assert.matches("no instance api:never\n", err, 1, true)
    code, _, err = ten(cfg, "stop", "apii:never")
    assert.are.equal(1, code)
    assert.matches('no instance apii:never (there is no service "apii")', err, 1, true)
  end)

  it("keeps instance output searchable, and across a restart of the server", function()
    -- each line names the process that wrote it, as ps does
    local first_pid = string.format("%d", ps(cfg)["api:boot"].pid)
    local code, out = ten(cfg, "logs", "api:boot")
    assert.are.equal(0, code)
    assert.matches("Z %[" .. first_pid .. "%] listening on", out)
    code, out = ten(cfg, "logs", "--search", "listening")
    assert.are.equal(0, code)
    assert.matches("api:boot[" .. first_pid .. "] listening on", out, 1, true)
    -- a search for what the index does not hold says so
    local err
    code, out, err = ten(cfg, "logs", "--search", "->")
    assert.are.same({ 0, "" }, { code, out })
    assert.matches('--search finds words of letters or digits, and "->" has none', err, 1, true)
    -- symbols outside ASCII are no words either
    for _, symbol in ipairs { "\u{1F389}", "\u{2713}" } do
      code, out, err = ten(cfg, "logs", "--search", symbol)
      assert.are.same({ 0, "" }, { code, out })
      assert.matches("--search finds words of letters or digits, and \"" .. symbol .. "\" has none: the index does not "
        .. "hold punctuation or symbols", err, 1, true)
    end
    -- a word of another script is one
    code, out, err = ten(cfg, "logs", "--search", "\u{65E5}\u{672C}")
    assert.are.same({ 0, "", "" }, { code, out, err })
    -- a name that is nobody's is said to be so, not shown as a quiet instance
    code, out, err = ten(cfg, "logs", "api:nope")
    assert.are.same({ 1, "" }, { code, out })
    assert.matches("no instance api:nope, and no lines of it in the store", err, 1, true)

    -- SIGTERM: every instance stopped, exit 0
    local boot_pid = ps(cfg)["api:boot"].pid
    assert.is_true(ten(cfg, "spawn", "api:later") == 0)
    assert.is_true(ten(cfg, "spawn", "sleepy:z") == 0)
    os.execute("kill -TERM " .. pid)
    for _ = 1, 100 do if not pid_alive(pid) then break end sleep(0.05) end
    assert.is_false(pid_alive(pid))
    assert.is_false(pid_alive(boot_pid))
    local f = io.open(log)
    local text = f:read("a")
    f:close()
    assert.matches("stopping every instance: requests in flight get up to 10 s to finish (drain_timeout), then "
      .. "each instance SIGTERM, and SIGKILL after 2 s (stop_timeout)", text, 1, true)
    assert.matches("api:boot running: pid " .. string.format("%d", boot_pid) .. " on %S+, ready in %d+ ms %(started from %[instances%]%)", text)
    assert.matches("api:later running: pid %d+ on %S+, ready in %d+ ms %(started by the API%)", text)
    assert.matches("api:boot stopped (server shutting down)", text, 1, true)
    assert.matches("api:later stopped (server shutting down)", text, 1, true)
    -- no server: the lines are read from the store
    code, out, err = ten(cfg, "logs", "api:boot")
    assert.are.equal(0, code)
    assert.matches("listening on", out, 1, true)
    assert.matches("no server is running; the lines below are read from ", err, 1, true)
    code, _, err = ten(cfg, "logs", "-f", "api:boot")
    assert.are.equal(1, code)
    assert.matches("--follow needs a running server", err, 1, true)

    pid = support.ten_serve(cfg, log .. "2")
    assert.is_true(wait_up(cfg))
    -- wait for the restored instances
    local by
    for _ = 1, 100 do
      by = ps(cfg)
      if by["api:later"] and by["api:later"].state == "running" then break end
      sleep(0.05)
    end
    assert.are.equal("running", by["api:boot"].state)
    assert.are.equal("running", by["api:later"].state)
    assert.are.equal("sleeping", by["sleepy:z"].state)
    -- where it will listen once woken, though no start has made it yet
    assert.are.equal(dir .. "/sock/sleepy-z.sock", by["sleepy:z"].socket)
    -- a stop of it has no process to end, and says so
    local scode, said = ten(cfg, "stop", "sleepy:z")
    assert.are.same({ 0, "sleepy:z stopped (it was asleep)\n" }, { scode, said })
    code, out = ten(cfg, "logs", "api:boot", "-n", "10")
    assert.are.equal(0, code)
    local _, count = out:gsub("listening on", "")
    assert.are.equal(2, count) -- the line from before the restart is still there
    -- each with its own process
    assert.matches("%[" .. first_pid .. "%] listening on.*%[" .. string.format("%d", by["api:boot"].pid)
      .. "%] listening on", out)
    assert.are_not.equal(first_pid, string.format("%d", by["api:boot"].pid))
  end)

  -- A second server on the same data_dir while the first one's control
  -- socket is gone: it waited 10 s "for the cleanup after the previous
  -- server", which was running, and then asked whether one was
  it("refuses at once a second server while the first one runs with its control socket removed", function()
    local socket = dir .. "/data/ten.sock"
    os.remove(socket)
    local t0 = os.time()
    local code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches(string.format("another ten serve (pid %d) is running with data_dir %s/data, though its control "
      .. "socket %s does not answer (removed, or the server is stopped): stop it first (kill %d)", pid, dir, socket,
      pid), err, 1, true)
    assert.is_true(os.time() - t0 < 8, "it waited for the lock")
    assert.is_true(pid_alive(pid))
    -- and the other commands say the same, not that no server runs
    code, _, err = ten(cfg, "ps")
    assert.are.equal(1, code)
    assert.matches(string.format("the ten server of this data directory runs (pid %d), but its control socket %s "
      .. "does not answer", pid, socket), err, 1, true)
  end)

  it("leaves no instance alive when the server is killed with SIGKILL", function()
    ten(cfg, "spawn", "api:a")
    ten(cfg, "spawn", "api:b")
    -- rolled out: its instances listen on sockets of their own ({socket}.N)
    assert.are.equal(0, (ten(cfg, "rollout", "api")))
    local rolled = ps(cfg)["api:a"].socket
    assert.matches("/api%-a%.sock%.%d+$", rolled)
    local pids = {}
    for _, i in pairs(ps(cfg)) do pids[#pids + 1] = i.pid end
    assert.are.equal(3, #pids)
    os.execute("kill -KILL " .. pid)
    sleep(1)
    for _, p in ipairs(pids) do assert.is_false(pid_alive(p), "instance " .. p .. " survived") end
    -- and a new server cleans up and restores them
    pid = support.ten_serve(cfg, log .. "2")
    assert.is_true(wait_up(cfg))
    local by
    for _ = 1, 100 do
      by = ps(cfg)
      if by["api:b"] and by["api:b"].state == "running" then break end
      sleep(0.05)
    end
    assert.are.equal("running", by["api:a"].state)
    assert.are.equal("running", by["api:b"].state)
    -- on their own sockets again, and the dead ones' files are gone
    assert.are.equal(dir .. "/sock/api-a.sock", by["api:a"].socket)
    for _, name in ipairs(require("tenement.core").fs.readdir(dir .. "/sock")) do
      assert.is_nil(name:match("%.sock%.%d+$"), name .. " was left behind")
    end
    assert.is_nil(io.open(rolled))
  end)

  it("kills what a process-isolated instance forked once the server is killed outright", function()
    local text = assert(io.open(log)):read("a")
    if not text:find("instance processes tracked in", 1, true) then
      pending("no instance cgroups on this host (see the serve log): nothing can find an instance's grandchildren")
      return
    end
    assert.are.equal(0, (ten(cfg, "spawn", "forky:a")))
    -- the forkn processes carry this spec's directory in their argv
    local wanted = table.concat({ FORKN, "3", dir }, "\0") .. "\0"
    local function forked()
      local found = {}
      for _, name in ipairs(require("tenement.core").fs.readdir("/proc") or {}) do
        local f = name:match("^%d+$") and io.open("/proc/" .. name .. "/cmdline")
        if f then
          if f:read("a") == wanted then found[#found + 1] = tonumber(name) end
          f:close()
        end
      end
      return found
    end
    local before
    for _ = 1, 100 do
      before = forked()
      if #before >= 4 then break end
      sleep(0.05)
    end
    assert.are.equal(4, #before, "forkn and its three children")
    -- the keeper: asleep beside the server, deaf to a SIGTERM while it lives
    local keeper
    for _, name in ipairs(require("tenement.core").fs.readdir("/proc") or {}) do
      local f = name:match("^%d+$") and io.open("/proc/" .. name .. "/stat")
      if f then
        local stat = f:read("a") or ""
        f:close()
        if stat:match("^%d+ %(tenement%-keeper%) %S+ " .. pid .. " ") then keeper = tonumber(name) end
      end
    end
    assert.is_not_nil(keeper, "no tenement-keeper beside ten serve")
    os.execute("kill -TERM " .. keeper)
    sleep(0.2)
    assert.is_true(pid_alive(keeper))
    for _, p in ipairs(before) do assert.is_true(pid_alive(p)) end
    os.execute("kill -KILL " .. pid)
    local left
    for _ = 1, 100 do
      left = {}
      for _, p in ipairs(before) do if pid_alive(p) then left[#left + 1] = p end end
      if #left == 0 then break end
      sleep(0.05)
    end
    assert.are.same({}, left, "survived the server: " .. table.concat(left, " "))
    for _ = 1, 100 do
      if not pid_alive(keeper) then break end
      sleep(0.05)
    end
    assert.is_false(pid_alive(keeper), "the keeper stayed after its work")
    assert.matches("is gone: killed what was left in its instance cgroups", assert(io.open(log)):read("a"), 1, true)
    -- the next server waited for that cleanup and starts clean
    pid = support.ten_serve(cfg, log .. "2")
    assert.is_true(wait_up(cfg))
    local state
    for _ = 1, 100 do
      local boot = ps(cfg)["api:boot"]
      state = boot and boot.state
      if state == "running" then break end
      sleep(0.05)
    end
    assert.are.equal("running", state)
  end)

  it("reads on past a TCP urgent mark instead of waiting for an edge that never comes", function()
    -- the request is queued whole, with urgent data in its middle, while the
    -- server is stopped; the server's first read ends at the mark
    local p = io.popen(string.format("%s %d localhost %d 2>&1", URGENT, port, pid))
    local out = p:read("a")
    local ok = p:close()
    assert.is_true(ok, out)
    assert.matches("^HTTP/1.1 %d%d%d", out)
  end)

  it("runs on one thread once its store is idle, and stays there while it proxies", function()
    -- a second thread shares the file table, and every system call on a
    -- socket then pays for it
    local function threads()
      local p = io.popen("ls /proc/" .. pid .. "/task")
      local n = 0
      for _ in p:lines() do n = n + 1 end
      p:close()
      return n
    end
    local n
    for _ = 1, 200 do
      n = threads()
      if n == 1 then break end
      sleep(0.05)
    end
    assert.are.equal(1, n)
    local core = require "tenement.core"
    core.run(function()
      local c = support.raw(port)
      for _ = 1, 50 do
        c:send("GET / HTTP/1.1\r\nHost: boot.api.localhost\r\n\r\n")
        local res = assert(c:response())
        assert.are.equal(200, res.status)
      end
      c.s:close()
    end)
    assert.are.equal(1, threads())
  end)

  it("refuses the control socket to a process in another PID namespace, as an instance under namespace isolation is", function()
    local probe = select(1, support.run("unshare --pid --fork --mount-proc true"))
    if probe ~= 0 then
      pending("unshare --pid needs root (or user namespaces) here: the refusal is not exercised")
      return
    end
    local code, _, err = support.run("unshare --pid --fork --mount-proc " .. support.clean_env() .. " "
      .. support.quote(support.ten) .. " --config " .. support.quote(cfg) .. " spawn api:intruder")
    assert.are.equal(1, code)
    assert.matches("the control socket answers the server's own host only: use the HTTP API with a token", err, 1, true)
    assert.is_nil(ps(cfg)["api:intruder"])
    -- from this namespace, as ever
    assert.are.equal(0, (ten(cfg, "ps")))
  end)

  it("says which half of the address to change when it cannot listen", function()
    local other = support.tmpdir()
    local code, _, err = ten(cfg, "serve", "--data-dir", other, "-p", tostring(port))
    assert.are.equal(1, code)
    assert.matches("EADDRINUSE: address already in use (another port: ten serve -p PORT, or port in [settings])",
      err, 1, true)
    -- 192.0.2.1 is for documentation (RFC 5737): no machine has it
    code, _, err = ten(cfg, "serve", "--data-dir", other, "--listen", "192.0.2.1", "-p", tostring(port))
    assert.are.equal(1, code)
    assert.matches("EADDRNOTAVAIL: address not available (an address of this machine: ten serve --listen ADDR, or "
      .. "listen in [settings])", err, 1, true)
    -- the port given with the address is shown where it goes, in the command line's words
    code, _, err = ten(cfg, "serve", "--data-dir", other, "--listen", "127.0.0.1:8080")
    assert.are.equal(2, code)
    assert.matches('--listen: "127.0.0.1:8080": the port goes in an option of its own: --listen 127.0.0.1 --port 8080',
      err, 1, true)
  end)

  it("refuses a second server on the same data directory", function()
    local code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches("already running", err, 1, true)
    assert.is_true(pid_alive(pid))
  end)

  it("ten ps --json is parseable and complete", function()
    local code, out = ten(cfg, "ps", "--json")
    assert.are.equal(0, code)
    local list = cjson.decode(out)
    assert.are.equal(1, #list)
    local i = list[1]
    for _, k in ipairs { "id", "service", "instance_id", "state", "health", "pid", "restarts", "socket", "isolation" } do
      assert.is_not_nil(i[k], k)
    end
  end)
end)

-- The starts of [instances] by a server of its own: make_lines(dir) gives
-- the config's lines. A failed spec leaves no server behind.
describe("ten serve on a configuration of its own", function()
  after_each(support.cleanup)

  -- a test's servers, all killed at its end however it ends (busted keeps
  -- one finally per test: the last one given)
  local started
  before_each(function() started = {} end)
  local function serve_own(make_lines)
    local dir = support.tmpdir()
    local cfg, log = dir .. "/tenement.toml", dir .. "/serve.log"
    support.write(cfg, table.concat(make_lines(dir), "\n") .. "\n")
    local pid = support.ten_serve(cfg, log)
    started[#started + 1] = pid
    finally(function()
      for _, p in ipairs(started) do
        if pid_alive(p) then os.execute("kill -KILL " .. p) end
      end
    end)
    return cfg, log, pid
  end

  -- SIGTERM, then waits up to 10 s for the server to be gone. -> gone
  local function stop(pid)
    os.execute("kill -TERM " .. pid)
    for _ = 1, 200 do
      if not pid_alive(pid) then break end
      sleep(0.05)
    end
    return not pid_alive(pid)
  end

  -- The server's log once it holds text (or after 5 s).
  local function log_with(log, text)
    local got
    for _ = 1, 100 do
      local f = io.open(log)
      got = f and f:read("a") or ""
      if f then f:close() end
      if got:find(text, 1, true) then break end
      sleep(0.05)
    end
    return got
  end

  it("runs an instance in a private file system: it serves, and sees neither the store nor the file", function()
    if not support.is_root() then
      pending("namespace isolation runs as root in these specs: the private file system is exercised in namespace_spec")
      return
    end
    local port = support.free_port()
    local cfg, log = serve_own(function(dir)
      local look = string.format("for p in %s/data/tenement.db %s/tenement.toml /root; do test -e $p && echo sees $p; done; "
        .. "echo looked; exec %s", dir, dir, BACKEND)
      return {
        "[settings]", 'data_dir = "data"', "port = " .. port, 'domain = "example.test"',
        "[service.api]", 'command = "sh"', string.format("args = [\"-c\", %q]", look),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'health = "/health"',
        'filesystem = "private"', string.format("mounts = [%q]", BACKEND:match("^(.*)/")),
        "[instances]", 'api = ["one"]',
      }
    end)
    local text = log_with(log, "api:one running")
    assert.is_truthy(text:find("api:one running", 1, true))
    -- what ten config warns of is a line of the server's log, with its time
    assert.matches("\n%d%d%d%d%-%d%d%-%d%dT[%d:]+Z warn " .. cfg:gsub("%p", "%%%0") .. ":%d+: service%.api%.socket = ", "\n" .. text)
    -- (not curl: under make asan the sanitizers are preloaded into every program, and curl hung there)
    local core = require "tenement.core"
    local res
    core.run(function()
      res = assert(core.http.request { host = "127.0.0.1", port = port, target = "/",
        headers = { host = "one.api.example.test" }, timeout = 10000 })
    end)
    assert.are.same({ 200, "hello from one\n" }, { res.status, res.body })
    local _, logs = ten(cfg, "logs", "api:one")
    assert.matches("looked\n", logs)
    assert.is_nil(logs:find("sees", 1, true), logs)
  end)

  it("starts all of [instances], and names each that did not start and where it came from", function()
    local cfg, log, pid = serve_own(function(dir)
      return {
        "[settings]", 'data_dir = "data"', "port = " .. support.free_port(), "backoff_base_ms = 20", "max_restarts = 0",
        "[service.api]", string.format("command = %q", BACKEND),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'health = "/health"', 'isolation = "process"',
        "[service.broken]", 'command = "/bin/false"',
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"',
        "[instances]", 'api = ["a", "b", "c"]', 'broken = ["x"]',
      }
    end)
    local function settled()
      local ok, by = pcall(ps, cfg)
      if not ok then return false end
      for _, key in ipairs { "api:a", "api:b", "api:c" } do
        if not (by[key] and by[key].state == "running") then return false end
      end
      return by["broken:x"] ~= nil and by["broken:x"].state == "failed"
    end
    for _ = 1, 200 do
      if settled() then break end
      sleep(0.05)
    end
    assert.is_truthy(settled(), "not all of [instances] settled")
    local text = log_with(log, "(from [instances])")
    assert.matches("broken:x did not start: [^\n]*%(from %[instances%]%)", text)
    assert.is_nil(text:find("api:%a did not start"))
    assert.is_true(stop(pid))
  end)

  it("refuses an instance whose socket another server's instance listens on, and leaves that socket be", function()
    -- two servers, two data directories, one socket template (as the
    -- default, which names no data directory, gives any two servers)
    local shared = support.tmpdir()
    local ports = {}
    local function lines(n)
      return function()
        ports[n] = support.free_port()
        return {
          "[settings]", 'data_dir = "data"', "port = " .. ports[n], "backoff_base_ms = 20", "max_restarts = 0",
          "[service.api]", string.format("command = %q", BACKEND),
          string.format("socket = %q", shared .. "/{name}-{id}.sock"), 'health = "/health"', 'isolation = "process"',
          "[instances]", 'api = ["prod"]',
        }
      end
    end
    local cfg1, _, pid1 = serve_own(lines(1))
    local function state(cfg)
      local ok, by = pcall(ps, cfg)
      return ok and by["api:prod"] and by["api:prod"].state
    end
    for _ = 1, 200 do
      if state(cfg1) == "running" then break end
      sleep(0.05)
    end
    assert.are.equal("running", state(cfg1))
    local cfg2, log2, pid2 = serve_own(lines(2))
    for _ = 1, 200 do
      if state(cfg2) == "failed" then break end
      sleep(0.05)
    end
    assert.are.equal("failed", state(cfg2))
    assert.matches(shared .. "/api-prod.sock is in use: another process listens on it", log_with(log2, "is in use"),
      1, true)
    assert.is_true(stop(pid2))
    -- the first server's instance kept its socket, and its traffic
    local core = require "tenement.core"
    core.run(function()
      assert(core.net.connect { path = shared .. "/api-prod.sock", timeout = 1000 }):close()
      local c = support.raw(ports[1])
      c:send("GET / HTTP/1.1\r\nHost: prod.api.localhost\r\n\r\n")
      assert.are.equal(200, assert(c:response()).status)
      c.s:close()
    end)
    assert.are.equal("running", state(cfg1))
    assert.is_true(stop(pid1))
  end)

  it("shows an app's control characters in ten logs instead of sending them to the terminal", function()
    local cfg = serve_own(function(dir)
      return {
        "[settings]", 'data_dir = "data"', "port = " .. support.free_port(),
        "[service.loud]", string.format("command = %q", "sh -c 'printf \"\\033[31mred\\033[0m bell\\007 tab\\tend\\n\"; exec "
          .. BACKEND .. "'"),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"',
        "[instances]", 'loud = ["a"]',
      }
    end)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
    local out
    for _ = 1, 100 do
      local _, o = ten(cfg, "logs", "loud:a")
      out = o
      if out:find("red", 1, true) then break end
      sleep(0.05)
    end
    assert.matches(" \\x1b[31mred\\x1b[0m bell\\x07 tab\tend\n", out, 1, true)
    assert.is_nil(out:find("\27", 1, true))
  end)

  it("does not report as failed the starts its own stop ended", function()
    local cfg, log, pid = serve_own(function(dir)
      return {
        "[settings]", 'data_dir = "data"', "port = " .. support.free_port(), "stop_timeout = 2",
        "[service.slow]", string.format("command = %q", "sh -c 'sleep 5; exec " .. BACKEND .. "'"),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"', "startup_timeout = 30",
        "[instances]", 'slow = ["a", "b"]',
      }
    end)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
    assert.are.equal("starting", ps(cfg)["slow:a"].state)
    assert.is_true(stop(pid))
    local text = log_with(log, "stopped")
    assert.matches("stopped", text)
    assert.is_nil(text:find("did not start", 1, true), text)
  end)
  -- A server whose one instance ignores SIGTERM, with both timeouts far
  -- longer than any test waits. -> cfg, log, pid, port, the instance's pid
  local function serve_stubborn()
    local port = support.free_port()
    local cfg, log, pid = serve_own(function(dir)
      return {
        "[settings]", 'data_dir = "data"', "port = " .. port, "drain_timeout = 600", "stop_timeout = 600",
        "[service.stubborn]", string.format("command = %q", BACKEND),
        string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"', 'health = "/health"',
        "[service.stubborn.env]", 'BACKEND_IGNORE_TERM = "1"',
        "[instances]", 'stubborn = ["a"]',
      }
    end)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
    local inst
    for _ = 1, 100 do
      inst = ps(cfg)["stubborn:a"]
      if inst and inst.state == "running" then break end
      sleep(0.05)
    end
    assert.are.equal("running", inst.state)
    return cfg, log, pid, port, inst.pid
  end

  -- Up to 20 s (the timeouts are 600 s) for each pid to be gone. -> all gone
  local function gone(...)
    for _ = 1, 400 do
      local alive = false
      for _, p in ipairs { ... } do alive = alive or pid_alive(p) end
      if not alive then return true end
      sleep(0.05)
    end
    return false
  end

  it("stops at once on a second SIGINT while a request is in flight: its connection closed, instances SIGKILLed", function()
    local _, log, pid, port, inst_pid = serve_stubborn()
    local core = require "tenement.core"
    core.run(function()
      -- a response the client does not read: in flight until the drain ends
      local c = support.raw(port)
      c:send("GET /bytes?n=1000000000 HTTP/1.1\r\nHost: a.stubborn.localhost\r\n\r\n")
      assert.are.equal("HTTP/1.1 200 OK", c:line())
      os.execute("kill -INT " .. pid)
      assert.matches("a second SIGINT or SIGTERM stops them now", log_with(log, "stops them now"), 1, true)
      sleep(0.3)
      assert.is_true(pid_alive(pid), "the server did not wait for the request in flight")
      os.execute("kill -INT " .. pid)
      assert.is_true(gone(pid, inst_pid), "a second SIGINT did not stop the server and its instance")
      assert.is_true(c:closed())
    end)
    local text = log_with(log, "stopped")
    assert.matches("again: stopping now: open connections closed, SIGKILL to every instance still running", text, 1, true)
  end)

  it("stops at once on a second SIGTERM while an instance ignores the first one's SIGTERM", function()
    local _, log, pid, _, inst_pid = serve_stubborn()
    os.execute("kill -TERM " .. pid)
    log_with(log, "stops them now")
    sleep(0.5) -- the drain has nothing to wait for: the instance has its SIGTERM
    assert.is_true(pid_alive(inst_pid), "the instance did not ignore SIGTERM")
    os.execute("kill -TERM " .. pid)
    assert.is_true(gone(pid, inst_pid), "a second SIGTERM did not stop the server and its instance")
    assert.matches("again: stopping now", log_with(log, "stopped"), 1, true)
  end)

  it("ends a long poll for log lines when it stops, instead of waiting out the poll", function()
    local port = support.free_port()
    local cfg, log, pid = serve_own(function()
      return { "[settings]", 'data_dir = "data"', "port = " .. port, "drain_timeout = 600",
        "[service.api]", string.format("command = %q", BACKEND), 'isolation = "process"' }
    end)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
    local code, token = ten(cfg, "token-gen")
    assert.are.equal(0, code)
    token = token:match("%S+")
    local core = require "tenement.core"
    local status, answered
    -- a follower, remote: told that the stream ended, not left to think it quiet
    local follower_out = cfg:gsub("[^/]*$", "") .. "follow.out"
    local follower = io.popen(string.format("%s %s logs -f --server http://127.0.0.1:%d --token %s >%s 2>&1; "
      .. "echo $? >>%s", support.clean_env(), support.quote(support.ten), port, token, follower_out, follower_out))
    core.run(function()
      -- through the front door, which drains (the control socket just closes)
      local poll = core.spawn(function()
        local res, err = core.http.request { host = "127.0.0.1", port = port, method = "GET",
          target = "/api/logs?after=999999999&wait=60", timeout = 90000,
          headers = { host = "localhost", authorization = "Bearer " .. token } }
        status = res and res.status or err
      end)
      -- (time for the follower, a process of its own, to reach its stream too)
      core.sleep(800)
      os.execute("kill -TERM " .. pid)
      -- the poll asked for 60 s; the drain allows 600: 20 s is neither
      answered = poll:join(20000)
    end)
    assert.is_truthy(answered, "the poll was still waiting 20 s after SIGTERM")
    assert.are.equal(200, status) -- answered (no lines), not cut
    assert.is_true(gone(pid), "the server waited for the poll:\n" .. log_with(log, "stopped"))
    follower:read("a")
    follower:close()
    assert.matches("ten logs: the server ended the stream %(it is stopping%)\n1\n$", support.read(follower_out))
  end)
end)

-- Another user who may write in data_dir could swap {data_dir}/{service}
-- for a link to any directory, which the server (root) would fill and delete.
describe("ten serve with a data_dir that is not its own", function()
  it("refuses one another user owns or may write in, with the fix", function()
    if not support.is_root() then
      pending("chown to another user needs root: the refusal is not exercised")
      return
    end
    local dir = support.tmpdir()
    finally(support.cleanup)
    local data = dir .. "/data"
    local cfg = support.write(dir .. "/tenement.toml", table.concat({
      "[settings]", string.format("data_dir = %q", data), "port = " .. support.free_port(),
    }, "\n") .. "\n")
    assert(os.execute("mkdir " .. data .. " && chown 65534 " .. data .. " && chmod 700 " .. data))
    local code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches("data_dir " .. data .. " belongs to uid 65534, and ten serve runs as uid 0: that user could "
      .. "replace what the server writes and deletes there. `chown 0 " .. data .. "`", err, 1, true)
    assert(os.execute("chown 0 " .. data .. " && chmod 777 " .. data))
    code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches("data_dir " .. data .. " is writable by other users (mode 0777)", err, 1, true)
    assert.matches("`chmod go-w " .. data .. "`", err, 1, true)
    -- a shared one, as /tmp is: a directory of its own in it, not a chmod
    -- that would break every other user of it
    assert(os.execute("chmod 1777 " .. data))
    code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches("data_dir " .. data .. " is a directory every user may write in (mode 1777): give ten a directory "
      .. "of its own in it, e.g. --data-dir " .. data .. "/tenement", err, 1, true)
    assert.is_nil(err:find("chmod", 1, true), err)
    -- its own, but in a directory anyone may rename it out of
    assert(os.execute("chmod 711 " .. data .. " && chmod 777 " .. dir))
    code, _, err = ten(cfg, "serve")
    assert.are.equal(1, code)
    assert.matches("data_dir " .. data .. " is in " .. dir .. ", which other users may write in (mode 0777, not "
      .. "sticky)", err, 1, true)
    -- sticky, as /tmp is: no one renames what is not theirs
    assert(os.execute("chmod 1777 " .. dir))
    local pid = support.ten_serve(cfg, dir .. "/serve.log")
    -- (busted keeps one finally: this one takes over the cleanup)
    finally(function()
      if pid_alive(pid) then os.execute("kill -KILL " .. pid) end
      support.cleanup()
    end)
    assert.is_true(wait_up(cfg), "ten serve did not start in a sticky directory")
  end)

  it("starts no instance through a {data_dir}/{service} another user could have swapped", function()
    if not support.is_root() then
      pending("chown to another user needs root: the refusal is not exercised")
      return
    end
    local dir = support.tmpdir()
    local data, victim = dir .. "/data", dir .. "/victim"
    local cfg = support.write(dir .. "/tenement.toml", table.concat({
      "[settings]", string.format("data_dir = %q", data), "port = " .. support.free_port(),
      "[service.api]", string.format("command = %q", BACKEND),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"',
    }, "\n") .. "\n")
    assert(os.execute("mkdir -p " .. data .. " " .. victim .. " && chmod 711 " .. data
      .. " && ln -s " .. victim .. " " .. data .. "/api"))
    local pid = support.ten_serve(cfg, dir .. "/serve.log")
    finally(function()
      if pid_alive(pid) then os.execute("kill -KILL " .. pid) end
      support.cleanup()
    end)
    assert.is_true(wait_up(cfg), "ten serve did not come up")
    local code, _, err = ten(cfg, "spawn", "api:x")
    assert.are.equal(1, code)
    assert.matches(data .. "/api is a link, not a directory: another user could swap what the server makes and "
      .. "deletes there", err, 1, true)
    assert.matches("not retried", err, 1, true)
    assert.are.same({}, require("tenement.core").fs.readdir(victim))
    -- another user's directory there: the same
    assert(os.execute("rm " .. data .. "/api && mkdir " .. data .. "/api && chown 65534 " .. data .. "/api"))
    code, _, err = ten(cfg, "spawn", "api:y")
    assert.are.equal(1, code)
    assert.matches(data .. "/api is owned by uid 65534, not by uid 0 that ten serve runs as", err, 1, true)
  end)
end)

-- A full disk: what the operator asked (a stop, a spawn) is done, and when
-- the store cannot record it, said, not passed as done for good (a stopped
-- instance came back after a restart of the server, a spawned one did not).
describe("ten serve on a full disk", function()
  -- ten serve with its data_dir on a 4 MB file system of its own, api:boot
  -- running. -> { dir, disk, cfg, port, pid = the server's }, fill(), stop()
  local function serve_on_small_disk(service_lines)
    local dir = support.tmpdir()
    local disk = dir .. "/disk"
    assert(os.execute("mkdir -p " .. disk .. " && mount -t tmpfs -o size=4m tenement-spec " .. disk))
    local port = support.free_port()
    local lines = {
      "[settings]", string.format("data_dir = %q", disk .. "/data"), "port = " .. port,
      "stop_timeout = 2",
      "[service.api]", string.format("command = %q", BACKEND),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"',
    }
    for _, l in ipairs(service_lines or {}) do lines[#lines + 1] = l end
    lines[#lines + 1] = "[instances]"
    lines[#lines + 1] = 'api = ["boot"]'
    local srv = { dir = dir, disk = disk, port = port,
      cfg = support.write(dir .. "/tenement.toml", table.concat(lines, "\n") .. "\n") }
    local function up()
      srv.pid = support.ten_serve(srv.cfg, dir .. "/serve.log", true)
      assert.is_true(wait_up(srv.cfg), "ten serve did not come up")
      for _ = 1, 200 do
        if (ps(srv.cfg)["api:boot"] or {}).state == "running" then break end
        sleep(0.05)
      end
    end
    local function down(signal)
      if pid_alive(srv.pid) then os.execute("kill -" .. signal .. " " .. srv.pid) end
      for _ = 1, 200 do if not pid_alive(srv.pid) then break end sleep(0.05) end
    end
    srv.restart = function() down("TERM"); up() end
    srv.fill = function() os.execute("dd if=/dev/zero of=" .. disk .. "/fill bs=64k 2>/dev/null") end
    srv.stop = function()
      down("KILL")
      os.execute("umount -l " .. disk)
      support.cleanup()
    end
    up()
    return srv
  end

  it("says when a stop or a spawn could not be recorded, and changes no weight it could not record", function()
    if not support.is_root() then
      pending("mounting a small file system needs root: the full disk is not exercised")
      return
    end
    local srv = serve_on_small_disk()
    finally(srv.stop)
    local dir, disk, cfg, port = srv.dir, srv.disk, srv.cfg, srv.port
    local _, token = ten(cfg, "token-gen")
    token = token:match("%S+")
    srv.fill()

    local code, out, err = ten(cfg, "stop", "api:boot")
    assert.are.equal(1, code)
    assert.matches("^api:boot stopped", out)
    assert.matches("ten stop: api:boot: the store could not record the stop (", err, 1, true)
    assert.matches("after a restart of ten serve it will start again\n", err, 1, true)
    -- the machine's state, so the file, not the statement that met it
    assert.matches("database or disk is full (" .. disk .. "/data/tenement.db)", err, 1, true)
    assert.is_nil(err:find("(in: ", 1, true), err)
    -- started again: what the store still holds (it runs), so nothing is lost
    code, out, err = ten(cfg, "spawn", "api:boot")
    assert.are.same({ 0, "" }, { code, err })
    assert.is_nil(ps(cfg)["api:boot"].unsaved)
    code, out, err = ten(cfg, "spawn", "api:new")
    assert.are.equal(1, code)
    assert.matches("api:new is running", out, 1, true)
    assert.matches("ten spawn: api:new: the store could not record the start (", err, 1, true)
    assert.matches("after a restart of ten serve it will not be started again\n", err, 1, true)
    -- and the API's stop says so to a client that asks nothing more
    local status, body
    local function api(method, target, json)
      require("tenement.core").run(function()
        local res = assert(require("tenement.core").http.request { host = "127.0.0.1", port = port, method = method,
          target = target, headers = { host = "localhost", authorization = "Bearer " .. token,
          ["content-type"] = json and "application/json" or nil }, body = json })
        status, body = res.status, res.body
      end)
    end
    api("DELETE", "/api/instances/api:boot")
    assert.are.equal(200, status)
    assert.matches('"state":"stopped"', body, 1, true)
    assert.matches('"unsaved":"the store could not record the stop (', body, 1, true)
    code, out, err = ten(cfg, "spawn", "api:boot")
    assert.are.same({ 0, "" }, { code, err })
    -- and ps says so under its table
    code, out, err = ten(cfg, "ps")
    assert.are.equal(0, code)
    assert.matches("api:new", out, 1, true)
    assert.matches("warning: api:new: the store could not record the start (", err, 1, true)
    -- the new process's first line did not reach the store either: said, with the file
    local said
    for _ = 1, 100 do
      said = support.read(dir .. "/serve.log"):match("writing %d+ log lines to " .. disk:gsub("%p", "%%%0")
        .. "/data/tenement.db failed, trying again: [^\n]*full")
      if said then break end
      sleep(0.05)
    end
    assert.is_truthy(said, support.read(dir .. "/serve.log"))
    -- a weight is routing: changed only when it is kept
    code, _, err = ten(cfg, "weight", "api:boot", "50")
    assert.are.equal(1, code)
    assert.matches("the weight was not changed: the store could not record it", err, 1, true)
    assert.are.equal(100, ps(cfg)["api:boot"].weight)
    -- through the routes API too: it answered 200 with nothing changed
    api("PUT", "/api/routes/api", '{"weights":{"boot":30}}')
    assert.are.equal(500, status)
    assert.matches("api:boot: the weight was not changed: the store could not record it", body, 1, true)
    assert.are.equal(100, ps(cfg)["api:boot"].weight)

    -- room again: recorded, and nothing left to say
    os.remove(disk .. "/fill")
    code, out, err = ten(cfg, "spawn", "api:boot")
    assert.are.same({ 0, "" }, { code, err })
    assert.is_nil(ps(cfg)["api:boot"].unsaved)
    assert.are.equal(0, (ten(cfg, "weight", "api:boot", "50")))
    assert.are.equal(50, ps(cfg)["api:boot"].weight)
  end)

  -- The weight is the last thing a deploy writes, once its version is
  -- healthy: refused there, the version goes and nothing else moves.
  it("changes nothing when a deploy's healthy version gets a weight the store cannot record", function()
    if not support.is_root() then
      pending("mounting a small file system needs root: the full disk is not exercised")
      return
    end
    -- slow to start: the disk fills while the deploy waits for its health
    local srv = serve_on_small_disk { "[service.api.env]", 'BACKEND_START_DELAY_MS = "2000"' }
    finally(srv.stop)
    local cfg, dir = srv.cfg, srv.dir
    os.execute(string.format("(%s %s --config %s deploy api:v2 -w 50 --timeout 30 >%s 2>%s; echo $? >%s) &",
      support.clean_env(), support.quote(support.ten), support.quote(cfg), support.quote(dir .. "/deploy.out"),
      support.quote(dir .. "/deploy.err"), support.quote(dir .. "/deploy.rc")))
    local state
    for _ = 1, 200 do
      state = (ps(cfg)["api:v2"] or {}).state
      if state == "starting" then break end
      sleep(0.05)
    end
    assert.are.equal("starting", state)
    srv.fill()
    local rc
    for _ = 1, 400 do
      rc = support.read(dir .. "/deploy.rc")
      if rc and rc ~= "" then break end
      sleep(0.05)
    end
    assert.are.equal("1", (rc or ""):match("%d+"), support.read(dir .. "/deploy.err"))
    local err = support.read(dir .. "/deploy.err")
    assert.matches("deploy of api:v2 failed: the weight was not changed: the store could not record it (", err, 1, true)
    assert.matches("; nothing changed", err, 1, true)
    -- the version is gone, api:boot serves as before
    local now = ps(cfg)
    assert.is_nil(now["api:v2"])
    assert.are.same({ "running", 100 }, { now["api:boot"].state, now["api:boot"].weight })
    -- and a restart with room again brings no version nobody promoted
    os.remove(srv.disk .. "/fill")
    srv.restart()
    now = ps(cfg)
    assert.is_true(now["api:v2"] == nil or now["api:v2"].state == "stopped", cjson.encode(now["api:v2"] or {}))
    assert.are.same({ "running", 100 }, { now["api:boot"].state, now["api:boot"].weight })
  end)
end)
