-- The front door of a real `ten serve`: routing, proxying, scale to zero,
-- weights and deploys, with real backends and real clients.
local core = require "tenement.core"
local support = require "support"
local _ -- a place for values a spec does not look at
local cjson = require "cjson"

local BACKEND = support.fixture("backend")

local sleep = support.sleep

-- services: name -> extra TOML lines; instances: TOML of [instances]
local function start_server(dir, services, opts)
  opts = opts or {}
  local port = support.free_port()
  local lines = {
    "[settings]",
    'data_dir = "data"',
    "port = " .. port,
    'domain = "example.test"',
    "health_check_interval = 1",
    "backoff_base_ms = 50",
    "stop_timeout = 2",
    "proxy_timeout = 2",
  }
  for _, l in ipairs(opts.settings or {}) do
    local key = l:match("^([%w_]+) =")
    for i = #lines, 2, -1 do
      if key and lines[i]:match("^" .. key .. " =") then table.remove(lines, i) end
    end
    lines[#lines + 1] = l
  end
  for name, extra in pairs(services) do
    lines[#lines + 1] = "[service." .. name .. "]"
    local has_command = false
    for _, l in ipairs(extra) do if l:match("^command =") then has_command = true end end
    if not has_command then lines[#lines + 1] = string.format("command = %q", BACKEND) end
    lines[#lines + 1] = string.format("socket = %q", dir .. "/sock/{name}-{id}.sock")
    lines[#lines + 1] = 'isolation = "process"'
    for _, l in ipairs(extra) do lines[#lines + 1] = l end
  end
  for _, l in ipairs(opts.tail or {}) do lines[#lines + 1] = l end
  local cfg = support.write(dir .. "/tenement.toml", table.concat(lines, "\n") .. "\n")
  local srv = { pid = support.ten_serve(cfg, dir .. "/serve.log"), port = port, cfg = cfg, dir = dir }
  for _ = 1, 100 do
    if support.ten_run { "ps", "--config", cfg } == 0 then break end
    sleep(0.05)
  end
  return srv
end

local function ten(srv, ...)
  return support.ten_run { "--config", srv.cfg, ... }
end

local function ps(srv)
  local code, out, err = ten(srv, "ps", "--json")
  assert(code == 0, err)
  local by = {}
  for _, i in ipairs(cjson.decode(out)) do by[i.id] = i end
  return by
end

local function wait_state(srv, key, state)
  for _ = 1, 200 do
    local ok, by = pcall(ps, srv) -- the server may still be starting
    local i = ok and by[key]
    if i and i.state == state then return i end
    sleep(0.05)
  end
  error(key .. " never reached " .. state .. ": " .. cjson.encode(ps(srv)[key] or {}))
end

-- A request through the front door (inside a task). -> res | nil, err
local function get(srv, host, target, opts)
  opts = opts or {}
  local headers = { host = host }
  for k, v in pairs(opts.headers or {}) do headers[k] = v end
  return core.http.request { host = "127.0.0.1", port = srv.port, method = opts.method or "GET",
    target = target or "/", headers = headers, body = opts.body, timeout = opts.timeout or 10000 }
end

local function run(fn) return core.run(fn) end

local function log_text(srv)
  local f = io.open(srv.dir .. "/serve.log")
  local t = f and f:read("a") or ""
  if f then f:close() end
  return t
end

-- `ten ARGS...` from inside a task, which yields while it runs (ten() blocks
-- the whole loop: no load would flow meanwhile). -> code, stdout
local function ten_in_task(srv, ...)
  local env = { "PATH=/usr/bin:/bin" }
  if os.getenv("ASAN_OPTIONS") then env[#env + 1] = "ASAN_OPTIONS=" .. os.getenv("ASAN_OPTIONS") end
  local p = assert(core.proc.spawn { argv = { support.ten, "--config", srv.cfg, ... }, env = env, stdout = "pipe",
    stderr = "pipe" })
  local out = p.stdout:read(20000) or ""
  local st = p:wait(30000)
  return st and st.code, out
end

-- Runs `during()` (in a task) while `clients` tasks GET host/target in a
-- loop. -> the requests made, and the statuses of those that did not get 200
local function under_load(srv, host, target, clients, during)
  local total, failures = 0, {}
  local stop = false
  local load = {}
  for i = 1, clients do
    load[i] = core.spawn(function()
      while not stop do
        local res = get(srv, host, target)
        total = total + 1
        if not res or res.status ~= 200 then failures[#failures + 1] = res and res.status or "no answer" end
      end
    end)
  end
  core.sleep(200)
  during()
  core.sleep(200)
  stop = true
  for i = 1, clients do load[i]:join() end
  return total, failures
end

describe("front door", function()
  local srv
  after_each(function()
    if srv then os.execute("kill -TERM " .. srv.pid .. " 2>/dev/null; sleep 0.3; kill -KILL " .. srv.pid .. " 2>/dev/null") end
    srv = nil
    support.cleanup()
  end)

  it("routes id.service.domain, service.domain, path and subdomain maps, and the bare domain", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"' }, web = {} }, { tail = {
      "[instances]", 'api = ["one", "two"]', 'web = ["main"]',
      "[routing.subdomain]", 'www = "web"', "[routing.path]", '"/shop" = "web"' } })
    wait_state(srv, "api:two", "running")
    wait_state(srv, "web:main", "running")
    run(function()
      local res = assert(get(srv, "one.api.example.test", "/"))
      assert.are.equal(200, res.status)
      assert.are.equal("one", res.headers["x-backend"])
      res = assert(get(srv, "TWO.API.example.test:80", "/"))
      assert.are.equal("two", res.headers["x-backend"])
      res = assert(get(srv, "api.example.test", "/"))
      assert.is_truthy(res.headers["x-backend"] == "one" or res.headers["x-backend"] == "two")
      res = assert(get(srv, "www.example.test", "/"))
      assert.are.equal("main", res.headers["x-backend"])
      res = assert(get(srv, "example.test", "/shop/cart"))
      assert.are.equal("main", res.headers["x-backend"])
      res = assert(get(srv, "example.test", "/health"))
      assert.are.equal(200, res.status)
      assert.matches('"status":"ok"', res.body, 1, true)
      res = assert(get(srv, "nope.example.test", "/"))
      assert.are.equal(404, res.status)
      res = assert(get(srv, "other.test", "/"))
      assert.are.equal(404, res.status)
      res = assert(get(srv, "bad_host!", "/"))
      assert.are.equal(400, res.status)
      -- the forwarded head: X-Forwarded-*, Host kept
      res = assert(get(srv, "one.api.example.test", "/echo"))
      local echo = res.body:lower()
      assert.matches("x-forwarded-for: 127.0.0.1", echo, 1, true)
      assert.matches("x-forwarded-host: one.api.example.test", echo, 1, true)
      assert.matches("x-forwarded-proto: http", echo, 1, true)
      assert.matches("host: one.api.example.test", echo, 1, true)
    end)
  end)

  it("streams 100 MB through, tunnels a WebSocket, and never lets a smuggled request reach the backend", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { settings = { "max_body_mb = 200" }, tail = { "[instances]", 'api = ["big"]' } })
    wait_state(srv, "api:big", "running")
    local function rss()
      local f = io.open("/proc/" .. srv.pid .. "/status")
      local kb = f:read("a"):match("VmRSS:%s*(%d+)")
      f:close()
      return tonumber(kb)
    end
    run(function()
      -- 100 MB upload, streamed: the server's memory stays flat
      local before = rss()
      local conn = assert(core.net.connect { host = "127.0.0.1", port = srv.port })
      local size = 100 * 1024 * 1024
      assert(conn:write("POST /sink HTTP/1.1\r\nHost: big.api.example.test\r\nContent-Length: " .. size .. "\r\n\r\n"))
      local piece = string.rep("x", 1024 * 1024)
      for _ = 1, 100 do assert(conn:write(piece)) end
      local answer = ""
      while not answer:find("received", 1, true) do answer = answer .. assert(conn:read(20000)) end
      assert.matches("received " .. size .. " bytes", answer, 1, true)
      conn:close()
      if os.getenv("ASAN_OPTIONS") then
        print("\n[skipped under ASan] RSS bound of a 100 MB upload")
      else
        assert.is_true(rss() - before < 30 * 1024, "RSS grew by " .. (rss() - before) .. " KiB")
      end

      -- a WebSocket-style upgrade: 101, then bytes both ways
      local ws = assert(core.net.connect { host = "127.0.0.1", port = srv.port })
      assert(ws:write("GET /ws HTTP/1.1\r\nHost: big.api.example.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"))
      local head = ""
      while not head:find("\r\n\r\n", 1, true) do head = head .. assert(ws:read(5000)) end
      assert.matches("^HTTP/1.1 101", head)
      assert(ws:write("ping through the tunnel"))
      local echoed = ""
      while #echoed < #"ping through the tunnel" do echoed = echoed .. assert(ws:read(5000)) end
      assert.are.equal("ping through the tunnel", echoed)
      ws:close()

      -- request smuggling: every attempt is answered 400 and none reaches the backend
      local function count()
        local res = assert(get(srv, "big.api.example.test", "/count"))
        return tonumber(res.body:match("%d+"))
      end
      local before_count = count()
      local attacks = {
        "POST / HTTP/1.1\r\nHost: big.api.example.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: big.api.example.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        "GET / HTTP/1.1\r\nHost: big.api.example.test\r\nX-A: 1\r\n folded\r\n\r\n",
        "GET / HTTP/1.1\nHost: big.api.example.test\n\n",
        "POST / HTTP/1.1\r\nHost: big.api.example.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: big.api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n5;a\"b\r\nhello\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\nHost : big.api.example.test\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: big.api.example.test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
      }
      for _, attack in ipairs(attacks) do
        local c = assert(core.net.connect { host = "127.0.0.1", port = srv.port })
        assert(c:write(attack))
        local reply = ""
        while true do
          local chunk = c:read(3000)
          if not chunk then break end
          reply = reply .. chunk
        end
        c:close()
        assert.matches("^HTTP/1.1 400", reply, nil, attack)
      end
      assert.are.equal(before_count + 1, count()) -- only the /count request itself
    end)
  end)

  it("does not create instances for unknown ids unless the service opts in, within max_instances", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {}, open = { "on_demand = true", "max_instances = 2" } })
    run(function()
      local res = assert(get(srv, "stranger.api.example.test", "/"))
      assert.are.equal(404, res.status)
      res = assert(get(srv, "a.open.example.test", "/"))
      assert.are.equal(200, res.status)
      assert.are.equal("a", res.headers["x-backend"])
      res = assert(get(srv, "b.open.example.test", "/"))
      assert.are.equal(200, res.status)
      res = assert(get(srv, "c.open.example.test", "/"))
      assert.are.equal(503, res.status)
      assert.matches("max_instances", res.body, 1, true)
      -- it waits on an operator: a client retrying on the header only knocks again
      assert.is_nil(res.headers["retry-after"])
    end)
    local by = ps(srv)
    assert.is_nil(by["api:stranger"])
    assert.is_nil(by["open:c"])
    assert.are.equal("running", by["open:a"].state)
    -- a stopped instance holds nothing, and leaves room
    assert.are.equal(0, (ten(srv, "stop", "open:a")))
    run(function()
      local res = assert(get(srv, "c.open.example.test", "/"))
      assert.are.equal(200, res.status)
      assert.are.equal("c", res.headers["x-backend"])
    end)
  end)

  it("puts idle instances to sleep and wakes them with one start for 100 waiting requests", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "idle_timeout = 1",
      "[service.api.env]", 'BACKEND_START_DELAY_MS = "300"' } }, { tail = { "[instances]", 'api = ["z"]' } })
    wait_state(srv, "api:z", "running")
    wait_state(srv, "api:z", "sleeping")
    -- asleep is as it should be: a script reading ten health's code is not
    -- told otherwise, and the check wakes nothing
    local code, out = ten(srv, "health", "api:z")
    assert.are.same({ 0, "api:z: asleep, not checked (its next request wakes it)\n" }, { code, out })
    assert.are.equal("sleeping", ps(srv)["api:z"].state)
    local results = {}
    run(function()
      local tasks = {}
      for i = 1, 100 do
        tasks[i] = core.spawn(function() return get(srv, "z.api.example.test", "/") end)
      end
      for i = 1, 100 do
        local ok, res = tasks[i]:join()
        assert.is_true(ok)
        results[i] = res and res.status
      end
    end)
    for i = 1, 100 do assert.are.equal(200, results[i], "request " .. i) end
    local i = ps(srv)["api:z"]
    assert.are.equal("running", i.state)
    assert.are.equal("woken for a request", i.reason) -- not the sleep's "idle for 1 s"
    run(function()
      local res = assert(get(srv, "example.test", "/metrics"))
      assert.matches('tenement_instance_wakes_total{service="api",id="z"} 1\n', res.body, 1, true)
    end)
    -- the log tells the story: started, asleep, woken
    local text = log_text(srv)
    assert.matches("api:z running: pid %d+ on %S+, ready in %d+ ms %(started from %[instances%]%)", text)
    assert.matches("api:z asleep (idle for 1 s)", text, 1, true)
    assert.matches("api:z running: pid %d+ on %S+, ready in %d+ ms %(woken for a request%)", text)
    local _, wakes = text:gsub("woken for a request", "")
    assert.are.equal(1, wakes)
  end)

  -- A start slower than idle_timeout used it up before the instance could
  -- take a request: it went to sleep as soon as it was ready.
  it("counts idle_timeout from the instance being ready, not from its start", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "idle_timeout = 2",
      "[service.api.env]", 'BACKEND_START_DELAY_MS = "3000"' } })
    assert.are.equal(0, (ten(srv, "spawn", "api:slow")))
    -- spawn returns once it is ready: a second later it still waits for work
    sleep(1)
    assert.are.equal("running", ps(srv)["api:slow"].state)
    wait_state(srv, "api:slow", "sleeping")
    assert.matches("api:slow idle for 2 s: going to sleep", log_text(srv), 1, true)
  end)

  -- The service's host answered 503 at once while its only instance went to
  -- sleep (or restarted), where the instance's own host waited and served.
  it("has a request to the service's host wait for an instance going to sleep, then wake it", function()
    local dir = support.tmpdir()
    -- an app that takes its time to stop: stop_timeout (2 s) ends it
    srv = start_server(dir, { api = { 'health = "/health"', "idle_timeout = 1",
      "[service.api.env]", 'BACKEND_IGNORE_TERM = "1"' } }, { tail = { "[instances]", 'api = ["z"]' } })
    wait_state(srv, "api:z", "running")
    wait_state(srv, "api:z", "stopping")
    local res
    run(function() res = get(srv, "api.example.test", "/", { timeout = 10000 }) end)
    assert.are.equal(200, res and res.status)
    assert.are.equal("running", ps(srv)["api:z"].state)
  end)

  it("answers 503 with Retry-After to every waiter when a wake fails, and the next request may try again", function()
    local dir = support.tmpdir()
    local flag = dir .. "/ok"
    -- the supervisor goes on restarting it, every 200 ms: a wake that waited
    -- for that in vain is no verdict
    srv = start_server(dir, { api = {
      string.format("command = %q", "test -f " .. flag .. " && exec " .. BACKEND),
      "startup_timeout = 1", "idle_timeout = 1" } },
      { settings = { "backoff_base_ms = 200", "backoff_max_ms = 200", "max_restarts = 1000" },
        tail = { "[instances]", 'api = ["w"]' } })
    sleep(0.5)
    local statuses, retry = {}, {}
    run(function()
      local tasks = {}
      for i = 1, 20 do tasks[i] = core.spawn(function() return get(srv, "w.api.example.test", "/") end) end
      for i = 1, 20 do
        local _, res = tasks[i]:join()
        statuses[i] = res and res.status
        retry[i] = res and res.headers["retry-after"]
      end
    end)
    for i = 1, 20 do
      assert.are.equal(503, statuses[i])
      assert.is_not_nil(retry[i])
    end
    support.write(flag, "")
    run(function()
      local res = assert(get(srv, "w.api.example.test", "/"))
      assert.are.equal(200, res.status)
    end)
  end)

  it("leaves an app that crashed under restart = never failed: no request starts it again, ten restart does", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'restart = "never"' } }, { tail = { "[instances]", 'api = ["n"]' } })
    local pid = wait_state(srv, "api:n", "running").pid
    run(function()
      local res = get(srv, "n.api.example.test", "/crash")
      assert.are.equal(502, res and res.status)
    end)
    local inst = wait_state(srv, "api:n", "failed")
    assert.matches('^exited with code 3; not restarted %(restart = "never"%)', inst.last_exit)
    run(function()
      local res = assert(get(srv, "n.api.example.test", "/"))
      assert.are.equal(503, res.status)
      assert.matches("api:n has failed (exited with code 3; not restarted", res.body, 1, true)
      assert.is_nil(res.headers["retry-after"])
    end)
    assert.are.equal("failed", ps(srv)["api:n"].state)
    local code, out = ten(srv, "restart", "api:n")
    assert.are.equal(0, code, out)
    local again = wait_state(srv, "api:n", "running")
    assert.are_not.equal(pid, again.pid)
    run(function() assert.are.equal(200, assert(get(srv, "n.api.example.test", "/")).status) end)
  end)

  it("never puts an instance to sleep while a request is in flight", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { "idle_timeout = 1" } }, { settings = { "proxy_timeout = 10" },
      tail = { "[instances]", 'api = ["busy"]' } })
    wait_state(srv, "api:busy", "running")
    run(function()
      local res = assert(get(srv, "busy.api.example.test", "/sleep?ms=3000"))
      assert.are.equal(200, res.status)
    end)
    assert.are.equal("running", ps(srv)["api:busy"].state)
  end)

  it("answers 502 when the instance is gone and 504 when it is too slow", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["slow"]' } })
    wait_state(srv, "api:slow", "running")
    run(function()
      local res = assert(get(srv, "slow.api.example.test", "/hang"))
      assert.are.equal(504, res.status)
      -- /crash takes the backend down mid-request: the client gets an answer, never a hang
      local cres = get(srv, "slow.api.example.test", "/crash")
      assert.is_truthy(cres == nil or cres.status == 502)
    end)
  end)

  it("logs at most 10 failed upstream answers a second, and counts the rest", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["bad"]' } })
    wait_state(srv, "api:bad", "running")
    local n, first, last = 100, nil, nil
    run(function()
      first = core.now()
      for _ = 1, n do
        -- bytes that are no HTTP answer, then the close: a 502 each
        local res = assert(get(srv, "bad.api.example.test", "/raw?r=junk&close=1"))
        assert.are.equal(502, res.status)
      end
      last = core.now()
    end)
    local logged, told
    local deadline = os.time() + 10
    repeat
      local text = log_text(srv)
      logged, told = 0, 0
      for _ in text:gmatch("warn api:bad did not answer: [^\n]*") do logged = logged + 1 end
      for more in text:gmatch("(%d+) more front door errors in that second not logged") do told = told + tonumber(more) end
      if logged + told < n then sleep(0.1) end
    until logged + told >= n or os.time() > deadline
    assert.are.equal(n, logged + told)
    -- the seconds the requests spanned (the server's clock is the same
    -- monotonic one), ten lines in each at most
    local seconds = last // 1000 - first // 1000 + 1
    assert.is_true(logged <= 10 * seconds, logged .. " lines in " .. seconds .. " s")
    assert.is_true(told > 0)
  end)

  it("tells the count of failed upstream answers not logged when it stops within their second", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["bad"]' } })
    wait_state(srv, "api:bad", "running")
    local n = 30
    run(function()
      -- early in a second of the server's clock (the same monotonic one),
      -- so the stop comes well before that second is over
      for _ = 1, 2000 do
        if (core.hrtime() // 1000000) % 1000 < 200 then break end
        core.sleep(1)
      end
      for _ = 1, n do
        local res = assert(get(srv, "bad.api.example.test", "/raw?r=junk&close=1"))
        assert.are.equal(502, res.status)
      end
    end)
    os.execute("kill -TERM " .. srv.pid)
    local text
    for _ = 1, 200 do
      text = log_text(srv)
      if text:find(" info stopped\n") then break end
      sleep(0.05)
    end
    assert.matches(" info stopped\n", text)
    srv = nil
    local logged, told = 0, 0
    for _ in text:gmatch("warn api:bad did not answer: [^\n]*") do logged = logged + 1 end
    for more in text:gmatch("(%d+) more front door errors in that second not logged") do told = told + tonumber(more) end
    assert.are.equal(n, logged + told)
  end)

  it("says a reload applied a hook whose file changed, and refuses a reload whose hook does not load", function()
    local dir = support.tmpdir()
    local hook = dir .. "/hook.lua"
    support.write(hook, 'return { route = function(r, v, default) return default() end }\n')
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]', "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:one", "running")
    -- the same file, other text: the hook is new
    support.write(hook, 'return { route = function(r, v, default)\n  if r.path == "/teapot" then '
      .. 'return { kind = "status", status = 418, reason = "teapot" } end\n  return default()\nend }\n')
    local code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("applied: hooks\n", out, 1, true)
    run(function() assert.are.equal(418, assert(get(srv, "one.api.example.test", "/teapot")).status) end)
    -- nothing changed: nothing said
    code, out = ten(srv, "reload")
    assert.are.equal(0, code)
    assert.is_nil(out:find("applied", 1, true), out)
    -- broken by the server's own judgement (it compiles, and returns no
    -- route), in the same edit as a new service with an instance: the
    -- reload changes nothing (it started the instance, which then had no
    -- route: every request to it was a 404)
    support.write(hook, "return { }\n")
    local file = dir .. "/tenement.toml"
    local text = support.read(file)
    support.write(file, (text:gsub('api = %["one"%]', 'api = ["one"]\nextra = ["x"]', 1))
      .. string.format('[service.extra]\ncommand = %q\nsocket = %q\nisolation = "process"\n', BACKEND,
        dir .. "/sock/{name}-{id}.sock"))
    code, out, err = ten(srv, "reload")
    assert.are.same({ 1, "" }, { code, out })
    assert.matches('hooks.router: ' .. hook .. ' must return a function, or a table with a function "route"; '
      .. "it returned a table with no route", err, 1, true)
    local _, ps = ten(srv, "ps")
    assert.is_nil(ps:find("extra", 1, true), ps)
    run(function() assert.are.equal(418, assert(get(srv, "one.api.example.test", "/teapot")).status) end)
  end)

  it("contains a router hook that throws, and follows one that answers", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return { route = function(request, view, default)
        if request.path == "/boom" then error("hook exploded") end
        if request.path == "/deny" then return { kind = "status", status = 403, reason = "denied by hook" } end
        if request.path == "/busy" then return { kind = "status", status = 503, reason = "maintenance" } end
        if request.path == "/later" then
          return { kind = "status", status = 503, reason = "maintenance", retry_after = 120 }
        end
        if request.headers["x-pick"] then return "api:" .. request.headers["x-pick"] end
        if request.path == "/say" then print("red \27[31m", ("y"):rep(20000)) end
        if request.path == "/nostatus" then return { kind = "status" } end
        if request.path == "/quiet" then return { kind = "status", status = 503 } end
        if request.path == "/upper" then return "API" end
        -- a rule that holds against any spelling of the host and the path
        if request.hostname == "one.api.example.test" and request.normal_path == "/secret" then
          return { kind = "status", status = 451, reason = request.host .. " " .. request.path }
        end
        return nil
      end }
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one", "two"]',
      "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:two", "running")
    run(function()
      local res = assert(get(srv, "one.api.example.test", "/boom"))
      assert.are.equal("one", res.headers["x-backend"]) -- default routing applied
      res = assert(get(srv, "one.api.example.test", "/deny"))
      assert.are.equal(403, res.status)
      assert.is_nil(res.headers["retry-after"])
      -- a hook's 503 tells when to come back, as the door's own do
      res = assert(get(srv, "one.api.example.test", "/busy"))
      assert.are.equal(503, res.status)
      assert.are.equal("5", res.headers["retry-after"])
      res = assert(get(srv, "one.api.example.test", "/later"))
      assert.are.equal("120", res.headers["retry-after"])
      res = assert(get(srv, "api.example.test", "/", { headers = { ["x-pick"] = "two" } }))
      assert.are.equal("two", res.headers["x-backend"])
      -- a hook's print: one line of the server's log, cut, without escape sequences
      assert.are.equal("one", assert(get(srv, "one.api.example.test", "/say")).headers["x-backend"])
      -- broken answers: the default routing, and the log says what came back
      res = assert(get(srv, "one.api.example.test", "/nostatus"))
      assert.are.equal("one", res.headers["x-backend"])
      res = assert(get(srv, "one.api.example.test", "/upper"))
      assert.are.equal("one", res.headers["x-backend"])
      -- no reason: no "not found" under a 503
      res = assert(get(srv, "one.api.example.test", "/quiet"))
      assert.are.same({ 503, "\n" }, { res.status, res.body })
      res = assert(get(srv, "ONE.Api.example.test.:8080", "/x/../%73ecret"))
      assert.are.same({ 451, "ONE.Api.example.test.:8080 /x/../%73ecret\n" }, { res.status, res.body })
    end)
    assert.matches("router hook failed", log_text(srv), 1, true)
    assert.matches("hook exploded", log_text(srv), 1, true)
    assert.matches("a status target needs status = an integer from 200 to 599, not none", log_text(srv), 1, true)
    assert.matches('"API": a string target must be SERVICE or SERVICE:ID', log_text(srv), 1, true)
    assert.matches("[hook route] red \\x1b[31m yyy", log_text(srv), 1, true)
    assert.matches("y [cut: 20010 bytes]\n", log_text(srv), 1, true)
    -- failing on every request, it does not write a line for each
    run(function()
      local tasks = {}
      for i = 1, 100 do tasks[i] = core.spawn(function() return get(srv, "one.api.example.test", "/boom") end) end
      for i = 1, 100 do assert.is_true((tasks[i]:join())) end
    end)
    local text
    for _ = 1, 60 do
      text = log_text(srv)
      if text:find("router hook failures in that second not logged", 1, true) then break end
      sleep(0.05)
    end
    local _, lines = text:gsub("router hook failed", "")
    assert.is_true(lines < 60, lines .. " lines for 101 failures")
    assert.matches("more router hook failures in that second not logged (at most 10 a second)", text, 1, true)
  end)

  it("rolls out a service under constant load with zero failed requests, and reloads the file", function()
    local dir = support.tmpdir()
    local function write_cfg(version, extra)
      local f = io.open(srv and srv.cfg or dir .. "/tenement.toml")
      local text = f:read("a")
      f:close()
      text = text:gsub('VERSION = "%d+"', 'VERSION = "' .. version .. '"')
      text = text:gsub("\n# extra.*$", "\n")
      support.write(srv.cfg, text .. "# extra\n" .. (extra or ""))
    end
    srv = start_server(dir, { api = { 'health = "/health"', "[service.api.env]", 'VERSION = "1"' } },
      { tail = { "[instances]", 'api = ["a", "b"]' } })
    wait_state(srv, "api:a", "running")
    wait_state(srv, "api:b", "running")
    local before = ps(srv)
    write_cfg("2")
    local total, failures
    run(function()
      local code, out
      total, failures = under_load(srv, "api.example.test", "/", 4, function()
        code, out = ten_in_task(srv, "rollout", "api")
      end)
      assert.are.equal(0, code, out)
      assert.matches("2 instance%(s%) replaced", out)
    end)
    assert.are.equal(0, #failures, "failed requests during the rollout: " .. table.concat(failures, ", ") .. "\n" .. log_text(srv))
    assert.is_true(total > 50, "too little load to mean anything: " .. total)
    local after = ps(srv)
    assert.are_not.equal(before["api:a"].pid, after["api:a"].pid)
    assert.are_not.equal(before["api:b"].pid, after["api:b"].pid)
    run(function()
      local res = assert(get(srv, "a.api.example.test", "/env"))
      assert.matches("VERSION=2", res.body, 1, true)
    end)

    -- ten reload: a new service and its instance start
    write_cfg("2", '[service.web]\ncommand = "' .. BACKEND .. '"\nsocket = "' .. dir
      .. '/sock/{name}-{id}.sock"\nisolation = "process"\n')
    local code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("added: web", out, 1, true)
    assert.is_nil(out:find("applied:", 1, true))
    -- a change of routing alone is said too
    write_cfg("2", '[service.web]\ncommand = "' .. BACKEND .. '"\nsocket = "' .. dir
      .. '/sock/{name}-{id}.sock"\nisolation = "process"\n[routing.subdomain]\nwww = "web"\n')
    code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("added: -\nremoved: -\nrolled out: -\napplied: routing\n", out, 1, true)
    -- a service with no process to replace takes a change at its next start, and is not said rolled out
    write_cfg("2", '[service.web]\ncommand = "' .. BACKEND .. '"\nsocket = "' .. dir
      .. '/sock/{name}-{id}.sock"\nisolation = "process"\n[service.web.env]\nV = "2"\n'
      .. '[routing.subdomain]\nwww = "web"\n')
    code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("rolled out: -\ntaken at the next start (no instance running): web\n", out, 1, true)
    assert.are.equal(0, (ten(srv, "spawn", "web:x")))
    -- a change of idle_timeout alone reaches web:x without replacing it
    local pid = ps(srv)["web:x"].pid
    write_cfg("2", '[service.web]\ncommand = "' .. BACKEND .. '"\nsocket = "' .. dir
      .. '/sock/{name}-{id}.sock"\nisolation = "process"\nidle_timeout = 600\n[service.web.env]\nV = "2"\n'
      .. '[routing.subdomain]\nwww = "web"\n')
    code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("rolled out: -\nupdated without a restart: web\n", out, 1, true)
    assert.are.equal(pid, ps(srv)["web:x"].pid)
    -- a reload of the same file says that nothing changed, and where a new version of the code goes
    code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("nothing changed in " .. dir .. "/tenement.toml (a new version of an app's own code is started "
      .. "with `ten rollout SERVICE`)\n", out, 1, true)
    -- a file that does not load changes nothing, and the server's log says so
    write_cfg("2", "[service.web]\ncommnd = 1\n")
    code, _, err = ten(srv, "reload")
    assert.are.equal(1, code)
    assert.matches("commnd", err, 1, true)
    assert.matches("error reload failed, nothing changed: [^\n]*commnd", log_text(srv))
    -- SIGHUP: the service is gone again, and its instance stopped
    write_cfg("2")
    os.execute("kill -HUP " .. srv.pid)
    for _ = 1, 100 do
      if not ps(srv)["web:x"] then break end
      sleep(0.05)
    end
    assert.is_nil(ps(srv)["web:x"])
    assert.matches("reloaded", log_text(srv), 1, true)
  end)

  it("hands a routed host to the C server and takes it back whenever the instance changes", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "idle_timeout = 2", "[service.api.env]", 'VERSION = "1"' } },
      { settings = { "proxy_timeout = 10" }, tail = { "[instances]", 'api = ["d"]' } })
    wait_state(srv, "api:d", "running")
    local host = "d.api.example.test"
    local function metric(body, pattern) return tonumber(body:match(pattern)) end
    run(function()
      for i = 1, 20 do assert.are.equal(200, assert(get(srv, host, "/")).status, "request " .. i) end
      -- the first was decided in Lua, the rest went straight through; both
      -- counted alike
      local m = assert(get(srv, "example.test", "/metrics")).body
      assert.are.equal(20, metric(m, 'tenement_http_requests_total{route="instance"} (%d+)'))
      assert.are.equal(20, metric(m, 'tenement_instance_requests_total{service="api",id="d",code="2xx"} (%d+)'))
      -- the service host's set goes to C too, and is counted as the service's
      for i = 1, 10 do assert.are.equal(200, assert(get(srv, "api.example.test", "/")).status, "request " .. i) end
      m = assert(get(srv, "example.test", "/metrics")).body
      assert.are.equal(20, metric(m, 'tenement_http_requests_total{route="instance"} (%d+)'))
      assert.are.equal(10, metric(m, 'tenement_http_requests_total{route="service"} (%d+)'))
      -- traffic on the direct route is activity: no sleep under it ...
      for _ = 1, 12 do
        assert.are.equal(200, assert(get(srv, host, "/")).status)
        core.sleep(250)
      end
    end)
    assert.are.equal("running", ps(srv)["api:d"].state)
    -- ... nor under a request in flight longer than idle_timeout
    run(function() assert.are.equal(200, assert(get(srv, host, "/sleep?ms=3000")).status) end)
    assert.are.equal("running", ps(srv)["api:d"].state)
    -- stopped: the next request is decided again (an operator's stop holds:
    -- 503) instead of going to a socket nobody listens on; spawned, it is
    -- served again
    assert.are.equal(0, (ten(srv, "stop", "api:d")))
    run(function()
      local res = assert(get(srv, host, "/"))
      assert.are.equal(503, res.status, res.body)
      local m = assert(get(srv, "example.test", "/metrics")).body
      assert.are.equal(0, metric(m, 'tenement_proxy_errors_total (%d+)'))
    end)
    assert.are.equal(0, (ten(srv, "spawn", "api:d")))
    run(function() assert.are.equal(200, assert(get(srv, host, "/")).status) end)
    -- a rollout under load on the direct route: traffic follows the new
    -- process, the old one drains, nothing fails
    local text = assert(io.open(srv.cfg)):read("a")
    support.write(srv.cfg, (text:gsub('VERSION = "1"', 'VERSION = "2"')))
    local total, failures
    run(function()
      local code, out
      total, failures = under_load(srv, host, "/env", 3, function() code, out = ten_in_task(srv, "rollout", "api") end)
      assert.are.equal(0, code, out)
      local res = assert(get(srv, host, "/env"))
      assert.matches("VERSION=2", res.body, 1, true)
    end)
    assert.are.equal(0, #failures, "failed requests during the rollout: " .. table.concat(failures, ", ") .. "\n" .. log_text(srv))
    assert.is_true(total > 50, "too little load to mean anything: " .. total)
    -- and once the traffic stops, idle_timeout puts it to sleep
    wait_state(srv, "api:d", "sleeping")
  end)

  it("follows weights, shifts traffic with route, and deploys only healthy versions", function()
    local dir = support.tmpdir()
    local bad = dir .. "/bad-version"
    srv = start_server(dir, { api = { 'health = "/health"',
      string.format("command = %q", "test ! -f " .. bad .. "-{id} && exec " .. BACKEND), "startup_timeout = 2" } },
      { tail = { "[instances]", 'api = ["blue", "green"]' } })
    wait_state(srv, "api:green", "running")
    assert.are.equal(0, (ten(srv, "weight", "api:green", "0")))
    run(function()
      for _ = 1, 20 do
        local res = assert(get(srv, "api.example.test", "/"))
        assert.are.equal("blue", res.headers["x-backend"])
      end
    end)
    local code, out = ten(srv, "route", "api", "--from", "blue", "--to", "green")
    assert.are.equal(0, code)
    assert.matches("api:green: weight 100", out, 1, true)
    run(function()
      for _ = 1, 20 do
        assert.are.equal("green", assert(get(srv, "api.example.test", "/")).headers["x-backend"])
      end
    end)
    code, out = ten(srv, "route", "api")
    assert.are.equal(0, code)
    assert.matches("api:blue%s+0", out)

    -- a deploy that cannot become healthy changes nothing
    support.write(bad .. "-v2", "")
    local err
    code, _, err = ten(srv, "deploy", "api:v2", "--timeout", "2")
    assert.are.equal(1, code)
    assert.matches("nothing changed", err, 1, true)
    assert.matches("exited with code 1", err, 1, true)
    assert.is_nil(ps(srv)["api:v2"])
    -- a good one gets its weight once healthy
    code, out = ten(srv, "deploy", "api:v3", "-w", "100")
    assert.are.equal(0, code)
    assert.matches("api:v3 is healthy with weight 100", out, 1, true)
    -- weights survive a restart of the server
    os.execute("kill -TERM " .. srv.pid)
    sleep(1)
    srv.pid = support.ten_serve(srv.cfg, dir .. "/serve.log", true)
    wait_state(srv, "api:blue", "running")
    assert.are.equal(0, ps(srv)["api:blue"].weight)
    assert.are.equal(100, ps(srv)["api:v3"].weight)
  end)

  it("keeps to the weights while instances sleep: the one asleep is woken when drawn", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "idle_timeout = 1" } },
      { tail = { "[instances]", 'api = ["prod", "canary"]' } })
    wait_state(srv, "api:prod", "sleeping")
    wait_state(srv, "api:canary", "sleeping")
    local by = { prod = 0, canary = 0 }
    run(function()
      -- canary awake, prod asleep: prod still gets its share, woken for it
      assert.are.equal(200, assert(get(srv, "canary.api.example.test", "/")).status)
      for _ = 1, 40 do
        local res = assert(get(srv, "api.example.test", "/"))
        assert.are.equal(200, res.status)
        by[res.headers["x-backend"]] = by[res.headers["x-backend"]] + 1
      end
    end)
    -- equal weights: each drawn 20 times in 40 on average; none at all for
    -- one of them is a chance of 2^-39
    assert.is_true(by.prod > 0 and by.canary > 0, cjson.encode(by))
    assert.matches("api:prod running: pid %d+ on %S+, ready in %d+ ms %(woken for a request%)", log_text(srv))
  end)

  it("leaves an instance an operator stopped down until it is spawned, and tells a client no more than the exit", function()
    local dir = support.tmpdir()
    srv = start_server(dir, {
      api = { 'health = "/health"' },
      leaky = { string.format("command = %q", "sh -c 'echo DB_PASSWORD=hunter2 connection refused >&2; exit 1'") },
    }, { settings = { "max_restarts = 1" }, tail = { "[instances]", 'api = ["a", "b"]', 'leaky = ["x"]' } })
    wait_state(srv, "api:b", "running")
    wait_state(srv, "leaky:x", "failed")
    assert.are.equal(0, (ten(srv, "stop", "api:a")))
    run(function()
      local res = assert(get(srv, "a.api.example.test", "/"))
      assert.are.equal(503, res.status)
      assert.matches("api:a was stopped by an operator (`ten spawn api:a` starts it)", res.body, 1, true)
      -- nor does the service's traffic start it
      for _ = 1, 10 do assert.are.equal("b", assert(get(srv, "api.example.test", "/")).headers["x-backend"]) end
    end)
    assert.are.equal("stopped", ps(srv)["api:a"].state)
    assert.are.equal(0, (ten(srv, "spawn", "api:a")))
    run(function() assert.are.equal("a", assert(get(srv, "a.api.example.test", "/")).headers["x-backend"]) end)

    -- a start that fails: its output stays between the operator and the log
    run(function()
      for _ = 1, 2 do
        local res = assert(get(srv, "x.leaky.example.test", "/"))
        assert.are.equal(503, res.status)
        assert.is_nil(res.body:find("hunter2", 1, true), res.body)
        assert.matches("exited with code 1 during startup", res.body, 1, true)
      end
    end)
    local _, out = ten(srv, "ps", "--json")
    assert.matches("hunter2", log_text(srv) .. out, 1, true) -- the operator still sees it
  end)

  it("follows the default routing when a router hook answers with a broken target, and never hangs on one", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      local trap = setmetatable({}, { __index = function() while true do end end })
      local liar = setmetatable({}, { __tostring = function() error("no name for me") end })
      return { route = function(request)
        local case = request.headers["x-case"]
        if case == "no-id" then return { kind = "instance", service = "api" } end
        if case == "bad-id" then return { kind = "instance", service = "api", id = "../../etc" } end
        if case == "bad-status" then return { kind = "status", status = "teapot" } end
        if case == "huge-status" then return { kind = "status", status = 1000, reason = "no" } end
        if case == "bad-reason" then return { kind = "status", status = 403, reason = {} } end
        if case == "bad-retry" then return { kind = "status", status = 503, retry_after = "soon" } end
        if case == "no-service" then return { kind = "service" } end
        if case == "trap" then return trap end
        if case == "liar" then return liar end
        if case == "throw-liar" then error(liar) end
        return nil
      end }
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]', "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:one", "running")
    run(function()
      for _, case in ipairs { "no-id", "bad-id", "bad-status", "huge-status", "bad-reason", "bad-retry", "no-service",
        "trap", "liar", "throw-liar" } do
        local res, err = get(srv, "one.api.example.test", "/", { timeout = 5000, headers = { ["x-case"] = case } })
        assert.is_not_nil(res, case .. ": " .. tostring(err))
        assert.are.equal(200, res.status, case .. ": " .. res.body .. log_text(srv))
        assert.are.equal("one", res.headers["x-backend"], case)
      end
      -- and the server still answers, in Lua and not
      assert.are.equal(200, assert(get(srv, "example.test", "/health")).status)
    end)
    assert.is_nil(ps(srv)["api:../../etc"])
    assert.matches("router hook " .. dir .. "/hook.lua returned an unusable target", log_text(srv), 1, true)
  end)

  it("holds max_instances against many strangers arriving at once", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { open = { "on_demand = true", "max_instances = 2", "[service.open.env]",
      'BACKEND_START_DELAY_MS = "300"' } })
    local statuses = {}
    run(function()
      local tasks = {}
      for i = 1, 12 do
        tasks[i] = core.spawn(function() return get(srv, "s" .. i .. ".open.example.test", "/") end)
      end
      for i = 1, 12 do
        local _, res = tasks[i]:join()
        statuses[i] = res and res.status
      end
    end)
    local made, ok = 0, 0
    for _ in pairs(ps(srv)) do made = made + 1 end
    for i = 1, 12 do
      if statuses[i] == 200 then ok = ok + 1 else assert.are.equal(503, statuses[i], "request " .. i) end
    end
    assert.is_true(made <= 2, made .. " instances for max_instances = 2")
    assert.is_true(ok <= 2, ok .. " strangers served for max_instances = 2")
  end)

  it("keeps the default routing whole whatever a router hook does to the view and the request", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return { route = function(request, view)
        local case = request.headers["x-case"]
        if case == "corrupt" then
          view.domain = nil
          view.services.ghost = true
          return "ghost"
        end
        if case == "rewrite-then-fail" then
          request.host = "two.api.example.test"
          error("changed my mind")
        end
      end }
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one", "two"]', "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:two", "running")
    run(function()
      for _, case in ipairs { "corrupt", "none", "rewrite-then-fail", "none" } do
        local res = assert(get(srv, "one.api.example.test", "/", { headers = { ["x-case"] = case } }))
        assert.are.equal(200, res.status, case .. ": " .. res.body)
        assert.are.equal("one", res.headers["x-backend"], case)
      end
      -- the two that fell back to the default routing are counted
      local m = assert(get(srv, "example.test", "/metrics")).body
      assert.matches("\ntenement_router_hook_failures_total 2\n", m, 1, true)
    end)
    assert.matches("router hook " .. dir .. "/hook.lua chose unknown service \"ghost\"", log_text(srv), 1, true)
  end)

  it("refuses a reload of a file with no service left, which would stop every instance", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]' } })
    local before = wait_state(srv, "api:one", "running")
    assert.is_number(before.pid)
    local text = support.read(srv.cfg)
    support.write(srv.cfg, "")
    local code, _, err = support.ten_run { "reload", "--data-dir", dir .. "/data" }
    assert.are.equal(1, code)
    assert.matches(srv.cfg .. " defines no service: this reload would stop and forget every instance of api. "
      .. "Nothing changed.", err, 1, true)
    support.write(srv.cfg, text)
    local now = ps(srv)["api:one"]
    assert.are.same({ "running", before.pid }, { now.state, now.pid })
  end)

  it("says a reload leaves running an instance [instances] no longer names, and how to stop it", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["a", "b"]' } })
    wait_state(srv, "api:a", "running")
    local before = wait_state(srv, "api:b", "running")
    support.write(srv.cfg, (support.read(srv.cfg):gsub('api = %["a", "b"%]', 'api = ["a"]')))
    local code, _, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("[instances] no longer names api:b: it stays running, and comes back after a restart of ten "
      .. "serve, until `ten stop api:b`", err, 1, true)
    assert.are.equal(before.pid, ps(srv)["api:b"].pid)
  end)

  -- a section renamed by mistake (one letter) took every instance's data
  it("keeps the data of a service a reload removes, and a reload that brings it back finds it", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]' } })
    local one = wait_state(srv, "api:one", "running")
    local data = dir .. "/data/api/one"
    support.write(data .. "/counter", "41\n")
    local text = support.read(srv.cfg)
    support.write(srv.cfg, (text:gsub("%[service%.api%]", "[service.apx]"):gsub('\napi = %["one"%]', '\napx = ["one"]')))
    local code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.matches("removed: api", out, 1, true)
    assert.matches("service api was removed: its instances stopped, and their data stays (" .. data .. "): a reload "
      .. "that brings the service back finds it; delete it by hand if it is gone for good", err, 1, true)
    assert.is_nil(ps(srv)["api:one"])
    assert.are.equal("41\n", support.read(data .. "/counter"))
    support.write(srv.cfg, text)
    code, _, err = ten(srv, "reload")
    assert.are.equal(0, code, err)
    assert.are_not.equal(one.pid, wait_state(srv, "api:one", "running").pid)
    assert.are.equal("41\n", support.read(data .. "/counter"))
  end)

  it("starts no instance new in [instances] with the old definition of a service whose rollout failed", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["a"]' } })
    local before = wait_state(srv, "api:a", "running")
    local text = support.read(srv.cfg)
    text = text:gsub('api = %["a"%]', 'api = ["a", "b"]'):gsub('command = "[^"]*"', 'command = "' .. dir
      .. '/no-such-app"', 1)
    support.write(srv.cfg, text)
    local code, _, err = ten(srv, "reload")
    assert.are.equal(1, code)
    assert.matches("api:b, new in [instances], was not started: the new definition of api failed to roll out "
      .. "(above); a reload that succeeds starts it", err, 1, true)
    sleep(0.3)
    assert.is_nil(ps(srv)["api:b"])
    assert.are.equal(before.pid, ps(srv)["api:a"].pid)
  end)

  it("does not start again an instance of a service a reload removes while a request asks for it", function()
    local dir = support.tmpdir()
    -- the instance ignores SIGTERM: its stop takes stop_timeout, and requests come meanwhile
    srv = start_server(dir, { api = {}, gone = { "[service.gone.env]", 'BACKEND_IGNORE_TERM = "1"' } },
      { tail = { "[instances]", 'api = ["one"]', 'gone = ["x"]', "[routing.subdomain]", 'www = "gone"' } })
    wait_state(srv, "gone:x", "running")
    -- the file without [service.gone] and its sub-tables (wherever the
    -- sections fell), its instance, and www pointing elsewhere
    local kept, skipping = {}, false
    for line in io.lines(srv.cfg) do
      if line:match("^%[") then skipping = line:match("^%[service%.gone[%].]") ~= nil end
      if not skipping and line ~= 'gone = ["x"]' then kept[#kept + 1] = (line:gsub('www = "gone"', 'www = "api"')) end
    end
    support.write(srv.cfg, table.concat(kept, "\n") .. "\n")
    local during = {}
    run(function()
      local reload = core.spawn(function() return ten_in_task(srv, "reload") end)
      for _ = 1, 100 do
        local _, out = ten_in_task(srv, "ps", "--json")
        local ok, list = pcall(cjson.decode, out)
        local stopping = false
        for _, i in ipairs(ok and list or {}) do
          if i.id == "gone:x" and i.state == "stopping" then stopping = true end
        end
        if stopping then break end
        core.sleep(50)
      end
      for _, host in ipairs { "x.gone.example.test", "gone.example.test", "www.example.test" } do
        local res = get(srv, host, "/")
        during[#during + 1] = res and res.status or "no answer"
      end
      local _, code = reload:join()
      assert.are.equal(0, code)
    end)
    for i, status in ipairs(during) do assert.are_not.equal(200, status, "request " .. i) end
    assert.is_nil(ps(srv)["gone:x"], log_text(srv))
  end)

  it("moves traffic with route and PUT /api/routes under load without a request left with no instance", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"' } }, { tail = { "[instances]", 'api = ["blue", "green"]' } })
    wait_state(srv, "api:blue", "running")
    wait_state(srv, "api:green", "running")
    assert.are.equal(0, (ten(srv, "weight", "api:green", "0")))
    local _, out = ten(srv, "token-gen")
    local token = out:match("^(%S+)")
    local total, failures
    run(function()
      total, failures = under_load(srv, "api.example.test", "/", 4, function()
        for i = 1, 6 do
          local from, to = "blue", "green"
          if i % 2 == 0 then from, to = to, from end
          local code, out = ten_in_task(srv, "route", "api", "--from", from, "--to", to)
          assert.are.equal(0, code, out)
          core.sleep(50)
        end
        -- several weights at once: whichever the server sets first
        for i = 1, 6 do
          local weights = i % 2 == 1 and '{"blue": 0, "green": 100}' or '{"blue": 100, "green": 0}'
          local res = assert(get(srv, "example.test", "/api/routes/api", { method = "PUT", body =
            '{"weights": ' .. weights .. '}', headers = { authorization = "Bearer " .. token } }))
          assert.are.equal(200, res.status, res.body)
          core.sleep(50)
        end
      end)
    end)
    assert.are.equal(0, #failures, "failed requests while traffic moved: " .. table.concat(failures, ", "))
    assert.is_true(total > 50, "too little load to mean anything: " .. total)
  end)

  it("has a request for an instance restarting after a crash wait for the restart, not a 502", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { settings = { "backoff_base_ms = 1500" }, tail = { "[instances]", 'api = ["b"]' } })
    wait_state(srv, "api:b", "running")
    run(function()
      get(srv, "b.api.example.test", "/crash")
    end)
    wait_state(srv, "api:b", "backoff")
    run(function()
      local res = assert(get(srv, "b.api.example.test", "/"))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("b", res.headers["x-backend"])
    end)
  end)

  it("says what a version was doing when a deploy's wait for it ran out", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "[service.api.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { settings = { "max_restarts = 100", "backoff_base_ms = 400" } })
    local code, out, err = ten(srv, "deploy", "api:v1", "--timeout", "1")
    assert.are.equal(1, code, out)
    -- a crash inside the wait, not slowness, is why
    assert.matches("not healthy within 1 s %(it is %a+; last exit: exited with code 3 during startup%); nothing changed",
      err)
    assert.is_nil(ps(srv)["api:v1"])
  end)

  it("says what a version's health check answered and what it wrote when its deploy failed", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', "[service.api.env]", 'BACKEND_HEALTH_STATUS = "503"' } })
    local code, out, err = ten(srv, "deploy", "api:v2", "--timeout", "1")
    assert.are.equal(1, code, out)
    assert.matches("not healthy within 1 s (it is starting; the last check: GET /health answered 503); nothing "
      .. "changed\nlast output:\n", err, 1, true)
    assert.matches("listening on", err, 1, true)
    assert.is_nil(ps(srv)["api:v2"])
  end)

  it("refuses to deploy over an id that is unhealthy instead of calling it healthy", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = { 'health = "/health"', 'restart = "never"', "[service.api.env]",
      'BACKEND_FAIL_HEALTH_AFTER = "1"' } }, { tail = { "[instances]", 'api = ["u"]' } })
    wait_state(srv, "api:u", "unhealthy")
    local code, out, err = ten(srv, "deploy", "api:u", "--timeout", "2")
    assert.are.equal(1, code, out)
    assert.matches("exists already", err, 1, true)
    assert.are.equal("unhealthy", ps(srv)["api:u"].state)
  end)

  it("hands a host to C only under the configuration that routed it, not one a reload replaced meanwhile", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { settings = { "proxy_timeout = 10" }, tail = { "[instances]", 'api = ["d"]' } })
    wait_state(srv, "api:d", "running")
    support.write(dir .. "/hook.lua", [[
      return function(request) return { kind = "status", status = 403, reason = "closed by the hook" } end
    ]])
    local text = assert(io.open(srv.cfg)):read("a")
    run(function()
      -- routed (and about to be handed to C) before the reload adds a hook
      local slow = core.spawn(function() return get(srv, "d.api.example.test", "/sleep?ms=1500") end)
      core.sleep(300)
      support.write(srv.cfg, text .. '[hooks]\nrouter = "hook.lua"\n')
      local code, out = ten_in_task(srv, "reload")
      assert.are.equal(0, code, out)
      local _, res = slow:join()
      assert.are.equal(200, res.status)
      for i = 1, 3 do
        local after = assert(get(srv, "d.api.example.test", "/"))
        assert.are.equal(403, after.status, "request " .. i .. " after the reload: " .. after.body)
      end
    end)
  end)

  it("hands a service host to C with the instances it has when the request ends, not when it began", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { settings = { "proxy_timeout = 10" }, tail = { "[instances]", 'api = ["a"]' } })
    wait_state(srv, "api:a", "running")
    local seen = {}
    run(function()
      -- routed while a is alone; b joins before it is over
      local slow = core.spawn(function() return get(srv, "api.example.test", "/sleep?ms=1500") end)
      core.sleep(200)
      local code, out = ten_in_task(srv, "spawn", "api:b")
      assert.are.equal(0, code, out)
      local _, res = slow:join()
      assert.are.equal(200, res.status)
      for _ = 1, 40 do
        local r = assert(get(srv, "api.example.test", "/"))
        seen[r.headers["x-backend"]] = (seen[r.headers["x-backend"]] or 0) + 1
      end
    end)
    assert.is_not_nil(seen.b, "api:b got none of 40 requests: " .. cjson.encode(seen))
  end)

  it("stops a router hook that catches its own budget error with pcall and loops on", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return function(request)
        if request.headers["x-case"] == "stubborn" then
          while true do pcall(function() while true do end end) end
        end
      end
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]', "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:one", "running")
    run(function()
      local res, err = get(srv, "one.api.example.test", "/", { timeout = 8000, headers = { ["x-case"] = "stubborn" } })
      assert.is_not_nil(res, "no answer: " .. tostring(err))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("one", res.headers["x-backend"])
    end)
    -- which file's hook, and where in it the budget ran out
    assert.matches("router hook failed (the default routing applies): hook exceeded its budget of 1000000 "
      .. "instructions (at " .. dir .. "/hook.lua:", log_text(srv), 1, true)
  end)

  it("keeps the libraries the server routes with out of a router hook's reach", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return function(request)
        local case = request.headers["x-case"]
        if case == "vandal" then
          string.lower = function() return "nowhere" end
          math.random = function() error("not random at all") end
        elseif case == "sneaky" then
          local meta = getmetatable("")
          if meta then meta.__index.match = function() return nil end end
        end
      end
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["one"]', "[hooks]", 'router = "hook.lua"' } })
    wait_state(srv, "api:one", "running")
    run(function()
      for _, case in ipairs { "vandal", "sneaky" } do
        assert(get(srv, "one.api.example.test", "/", { headers = { ["x-case"] = case } }))
        -- hosts not seen before (their normal form is cached) and a weighted choice
        local hosts = case == "vandal" and { "ONE.api.example.test", "api.example.test" }
          or { "One.api.example.test", "API.example.test:80" }
        for _, host in ipairs(hosts) do
          local res = assert(get(srv, host, "/"))
          assert.are.equal(200, res.status, case .. ", " .. host .. ": " .. res.body)
        end
      end
    end)
  end)

  it("applies a proxy_timeout a reload changes to the instances already running", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["t"]' } })
    wait_state(srv, "api:t", "running")
    run(function()
      local res = assert(get(srv, "t.api.example.test", "/sleep?ms=3000"))
      assert.are.equal(504, res.status) -- proxy_timeout = 2
    end)
    local text = assert(io.open(srv.cfg)):read("a")
    support.write(srv.cfg, (text:gsub("proxy_timeout = 2", "proxy_timeout = 10")))
    local code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, out .. err)
    run(function()
      local res = assert(get(srv, "t.api.example.test", "/sleep?ms=3000"))
      assert.are.equal(200, res.status, res.body)
    end)
  end)

  it("says which front door limits a reload cannot change without a restart, and keeps them", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { settings = { "keepalive_timeout = 60", "max_body_mb = 1" },
      tail = { "[instances]", 'api = ["k"]' } })
    wait_state(srv, "api:k", "running")
    local text = assert(io.open(srv.cfg)):read("a")
    support.write(srv.cfg, (text:gsub("keepalive_timeout = 60", "keepalive_timeout = 1"):gsub("max_body_mb = 1", "max_body_mb = 2")))
    local code, out, err = ten(srv, "reload")
    assert.are.equal(0, code, out .. err)
    assert.matches("needs a restart of ten serve: [^\n]*keepalive_timeout", out)
    assert.matches("needs a restart of ten serve: [^\n]*max_body_mb", out)
    -- the old limit is the one that holds
    run(function()
      local res = assert(get(srv, "k.api.example.test", "/sink", { method = "POST",
        body = string.rep("x", 1536 * 1024) }))
      assert.are.equal(413, res.status)
    end)
  end)

  -- Retry-After says the answer clears by itself: weights of 0 and an
  -- operator's stop only clear by an operator's hand
  it("answers a service's host with 503 without Retry-After when only an operator can change it", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { api = {} }, { tail = { "[instances]", 'api = ["a", "b"]' } })
    wait_state(srv, "api:a", "running")
    wait_state(srv, "api:b", "running")
    assert.are.equal(0, (ten(srv, "weight", "api:a", "0")))
    assert.are.equal(0, (ten(srv, "weight", "api:b", "0")))
    run(function()
      local res = assert(get(srv, "api.example.test", "/"))
      assert.are.equal(503, res.status)
      assert.matches("every instance of api has weight 0 (`ten weight api:ID N` gives one traffic)", res.body, 1, true)
      assert.is_nil(res.headers["retry-after"])
    end)
    assert.are.equal(0, (ten(srv, "weight", "api:a", "100")))
    assert.are.equal(0, (ten(srv, "stop", "api:a")))
    run(function()
      local res = assert(get(srv, "api.example.test", "/"))
      assert.are.equal(503, res.status)
      assert.matches("no instance of api can take requests now", res.body, 1, true)
      assert.is_nil(res.headers["retry-after"])
    end)
  end)

  it("answers a wake the supervisor gave up on without Retry-After", function()
    local dir = support.tmpdir()
    srv = start_server(dir, { crash = { "on_demand = true", "[service.crash.env]", 'BACKEND_EXIT_AT_ONCE = "3"' } },
      { settings = { "max_restarts = 1" } })
    run(function()
      local res = assert(get(srv, "c1.crash.example.test", "/", { timeout = 15000 }))
      assert.are.equal(503, res.status)
      assert.matches("gave up", res.body, 1, true)
      assert.is_nil(res.headers["retry-after"])
    end)
    assert.are.equal("failed", ps(srv)["crash:c1"].state)
  end)

  it("answers 503 with Retry-After, not 500, when a wake outlasts its wait", function()
    local dir = support.tmpdir()
    -- going to sleep takes stop_timeout (SIGTERM ignored), longer than a
    -- request waits for the wake that must come after it
    srv = start_server(dir, { api = { "idle_timeout = 1", "startup_timeout = 1", "[service.api.env]",
      'BACKEND_IGNORE_TERM = "1"' } }, { settings = { "stop_timeout = 4" }, tail = { "[instances]", 'api = ["s"]' } })
    wait_state(srv, "api:s", "running")
    wait_state(srv, "api:s", "stopping")
    run(function()
      local res = assert(get(srv, "s.api.example.test", "/"))
      assert.are.equal(503, res.status, res.body)
      assert.is_not_nil(res.headers["retry-after"])
    end)
  end)

  it("gives a router hook headers of its own, so what it hangs on them never runs outside its budget", function()
    local dir = support.tmpdir()
    support.write(dir .. "/hook.lua", [[
      return function(request)
        setmetatable(request.headers, { __index = function() while true do end end })
      end
    ]])
    srv = start_server(dir, { api = {} }, { tail = { "[hooks]", 'router = "hook.lua"' } })
    run(function()
      -- the API reads the Authorization header, which this request lacks
      local res, err = get(srv, "example.test", "/api/instances", { timeout = 5000 })
      assert.is_not_nil(res, "no answer: " .. tostring(err))
      assert.are.equal(401, res.status)
    end)
  end)
end)
