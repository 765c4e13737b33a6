-- make stress [STRESS="kill9 serve-kill conns slowloris malformed fuzz"]:
-- bounded, loopback only. Each test reports what ran and what held; the
-- table goes into bench/results/latest.{md,json} (section "stress").
--
--   kill9       thousands of SIGKILLs to instances while requests flow: no
--               request hangs, every restart waits what the backoff says
--   serve-kill  SIGKILL of ten serve under load, five times: no orphans, a
--               restart restores every instance, PRAGMA integrity_check ok
--   conns       10,000 concurrent connections to a ten serve whose fd limit
--               is 4096: it keeps answering, accepting backs off (no spin)
--   slowloris   1000 connections trickling a head: cut at header_timeout,
--               others still served
--   malformed   a corpus of malformed and smuggling requests: a 4xx (or a
--               close), never a crash, never a request passed on
--   fuzz        the libFuzzer targets (bench/fuzz) for FUZZ_SECONDS each
local core = require "tenement.core"
local lib = require "lib"
local report = require "report"

local ALL = { "kill9", "serve-kill", "conns", "slowloris", "malformed", "fuzz" }
local DOMAIN = "stress.test"

local rows, corpus_rows = {}, {}
local function result(test, ran, held, detail)
  rows[#rows + 1] = { test = test, ran = ran, held = held, detail = detail }
  lib.log("%-10s %s: %s (%s)", test, held and "HELD" or "FAILED", ran, detail)
end

local function base_settings(dir, port, extra)
  local s = { string.format("data_dir = %q", dir .. "/data"), "port = " .. port, string.format("domain = %q", DOMAIN),
    "health_check_interval = 3600", "stop_timeout = 2", "proxy_timeout = 5" }
  for _, l in ipairs(extra or {}) do s[#s + 1] = l end
  return s
end

-- opts: isolation (default "process"), health (default "/health"; false: none), command
local function backend_service(name, dir, opts)
  opts = opts or {}
  local lines = { string.format("command = %q", opts.command or lib.backend),
    string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"),
    string.format("isolation = %q", opts.isolation or "process") }
  if opts.health ~= false then lines[#lines + 1] = string.format("health = %q", opts.health or "/health") end
  return { name = name, lines = lines }
end

local function ids(prefix, n)
  local out = {}
  for i = 1, n do out[i] = string.format('"%s%d"', prefix, i) end
  return "[" .. table.concat(out, ", ") .. "]"
end

---------------------------------------------------------------------------
-- kill9

local function kill9()
  local dir = lib.tmpdir("stress-kill9")
  local port = lib.free_port()
  local N = 24
  local config = lib.ten_config {
    settings = base_settings(dir, port, { "backoff_base_ms = 20", "backoff_max_ms = 320", "restart_window = 2",
      "max_restarts = 1000000" }),
    services = { backend_service("api", dir), backend_service("timed", dir) },
    tail = { "[instances]", "api = " .. ids("k", N), 'timed = ["t"]' },
  }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv) end)
  assert(lib.ten_wait_state(srv, "running", N + 1, 30), "instances did not start")
  local seconds = tonumber(os.getenv("STRESS_KILL_SECONDS")) or 40
  local kills, requests, timeouts, max_ms = 0, 0, 0, 0
  local statuses = {}
  local timed = {} -- { delay measured (ms) } for timed:t, in order
  lib.run(function()
    local stop = false
    local function api(target)
      local res = core.http.request { path = srv.sock, method = "GET", target = target, timeout = 5000 }
      if not res or res.status ~= 200 then return nil end
      return lib.ints(lib.json.decode(res.body))
    end
    local tasks = {}
    for _ = 1, 8 do
      tasks[#tasks + 1] = core.spawn(function()
        while not stop do
          local t0 = core.hrtime()
          local res, err = lib.get({ port = port }, "/", { host = "api." .. DOMAIN }, 5000)
          local ms = (core.hrtime() - t0) / 1e6
          requests = requests + 1
          max_ms = math.max(max_ms, ms)
          local st = res and tostring(res.status) or tostring(err)
          if err == "timeout" then timeouts = timeouts + 1 end
          statuses[st] = (statuses[st] or 0) + 1
          if not res then core.sleep(1) end
        end
      end)
    end
    tasks[#tasks + 1] = core.spawn(function() -- the killer
      while not stop do
        local list = api("/api/instances") or {}
        local running = {}
        for _, i in ipairs(list) do
          if i.service == "api" and i.state == "running" and i.pid then running[#running + 1] = i.pid end
        end
        if #running > 0 then
          core.proc.kill(running[math.random(#running)], "SIGKILL")
          kills = kills + 1
        end
        core.sleep(3)
      end
    end)
    tasks[#tasks + 1] = core.spawn(function() -- timed:t, one kill at a time
      while not stop do
        local i = api("/api/instances/timed:t")
        if i and i.state == "running" and i.pid then
          local old = i.pid
          core.proc.kill(old, "SIGKILL")
          local t0 = core.hrtime()
          while not stop do
            local j = api("/api/instances/timed:t")
            if j and j.state == "running" and j.pid and j.pid ~= old then break end
            core.sleep(1)
          end
          if not stop then timed[#timed + 1] = (core.hrtime() - t0) / 1e6 end
        else
          core.sleep(2)
        end
      end
    end)
    core.sleep(seconds * 1000)
    stop = true
    for _, t in ipairs(tasks) do t:join() end
  end)
  -- what the server said it would wait, in order, for timed:t; and every
  -- delay it announced must be one the policy allows
  local log = lib.read(srv.log) or ""
  local allowed = { [20] = true, [40] = true, [80] = true, [160] = true, [320] = true }
  local said, bad_delays, restarts = {}, 0, 0
  for key, d in log:gmatch("(%S+) killed by SIGKILL; restarting in (%d+) ms") do
    d = tonumber(d)
    restarts = restarts + 1
    if not allowed[d] then bad_delays = bad_delays + 1 end
    if key == "timed:t" then said[#said + 1] = d end
  end
  local early, late, compared = 0, 0, 0
  local worst_extra = 0
  for i = 1, math.min(#said, #timed) do
    compared = compared + 1
    local extra = timed[i] - said[i]
    if extra < -1 then early = early + 1 end
    if extra > 250 then late = late + 1 end
    worst_extra = math.max(worst_extra, extra)
  end
  -- afterwards every instance comes back, with exactly one process each
  local back = lib.ten_wait_state(srv, "running", N + 1, 30, 0.1)
  local alive = lib.alive(srv.pid)
  local procs = #lib.marked() - (alive and 1 or 0) -- ten serve carries the mark too
  lib.stop_ten(srv)
  local st = {}
  for k, v in pairs(statuses) do st[#st + 1] = k .. ": " .. v end
  table.sort(st)
  result("kill9", string.format("%d SIGKILLs to %d instances in %d s under 8 concurrent clients, %d requests", kills, N,
    seconds, requests), timeouts == 0 and max_ms < 5000 and alive,
    string.format("no request hung: %d timeouts, slowest %.0f ms; statuses %s", timeouts, max_ms, table.concat(st, ", ")))
  result("kill9", string.format("%d restarts announced; %d kill-to-running delays of one instance timed", restarts, #timed),
    bad_delays == 0 and early == 0 and compared > 5,
    string.format("delays outside 20-320 ms doubling: %d; restarted before the announced delay: %d of %d; "
      .. "slowest %.0f ms past it (%d over 250 ms)", bad_delays, early, compared, worst_extra, late))
  result("kill9", "every instance back afterwards, no stray process", back ~= nil and procs == N + 1,
    string.format("%s; %d backend processes for %d instances", back and "all running" or "NOT all running", procs, N + 1))
end

---------------------------------------------------------------------------
-- serve-kill

local function serve_kill()
  local dir = lib.tmpdir("stress-serve")
  local port = lib.free_port()
  local forky = string.format("%s 3 & exec %s", lib.forkn, lib.backend)
  local config = lib.ten_config {
    settings = base_settings(dir, port),
    services = {
      backend_service("proc", dir),
      backend_service("ns", dir, { isolation = "namespace" }),
      backend_service("forky", dir, { command = forky, health = false }),
      backend_service("forkyns", dir, { command = forky, health = false, isolation = "namespace" }),
    },
    tail = { "[instances]", 'proc = ["a", "b"]', 'ns = ["a", "b"]', 'forky = ["a"]', 'forkyns = ["a"]' },
  }
  local expected = 7 -- 6 from [instances] + proc:dyn spawned through the API
  local cycles = tonumber(os.getenv("STRESS_SERVE_CYCLES")) or 5
  local orphans_by, integrity_ok, restored, restore_s = {}, 0, 0, {}
  local orphan_total = 0
  local srv
  for cycle = 1, cycles do
    srv = lib.start_ten { dir = dir, config = cycle == 1 and config or lib.read(dir .. "/tenement.toml"), port = port }
    if cycle == 1 then
      assert(lib.ten_wait_state(srv, "running", expected - 1, 30), "instances did not start: " .. (lib.read(srv.log) or ""))
      local _, status = lib.ten_api(srv, "POST", "/api/instances", '{"service":"proc","id":"dyn"}')
      assert(status == 201, "spawn proc:dyn through the API: " .. tostring(status))
    end
    local t = lib.ten_wait_state(srv, "running", expected, 30, 0.05)
    if t then restored = restored + 1 restore_s[#restore_s + 1] = lib.now() - srv.started end
    -- load, with log lines flowing into the store, then SIGKILL
    lib.run(function()
      local stop = false
      local tasks = {}
      for w = 1, 6 do
        tasks[w] = core.spawn(function()
          local hosts = { "a.proc", "b.proc", "dyn.proc", "a.ns", "b.ns" }
          local k = w
          while not stop do
            k = k % #hosts + 1
            lib.get({ port = port }, k % 2 == 0 and "/flood?lines=200" or "/", { host = hosts[k] .. "." .. DOMAIN }, 3000)
          end
        end)
      end
      core.sleep(2000)
      core.proc.kill(srv.pid, "SIGKILL")
      core.sleep(300)
      stop = true
      for _, tk in ipairs(tasks) do tk:join() end
    end)
    lib.wait_gone(srv.pid, 5)
    lib.forget(srv.pid)
    lib.sleep(1)
    -- anything of the instances still alive is an orphan
    for _, pid in ipairs(lib.marked()) do
      local comm = (lib.read("/proc/" .. pid .. "/comm") or "?"):gsub("%s+$", "")
      local env = lib.read("/proc/" .. pid .. "/environ") or ""
      local svc = env:match("SERVICE_NAME=([%w-]+)") or "?"
      local key = svc .. " (" .. comm .. ")"
      orphans_by[key] = (orphans_by[key] or 0) + 1
      orphan_total = orphan_total + 1
      core.proc.kill(pid, "SIGKILL")
    end
    local ok = lib.run(function()
      local conn = assert(core.db.open(dir .. "/data/tenement.db"))
      local check = conn:query("PRAGMA integrity_check")
      conn:close()
      return check and check[1] and check[1].integrity_check == "ok"
    end)
    if ok then integrity_ok = integrity_ok + 1 end
  end
  -- a last start: state restored once more, then a clean stop
  srv = lib.start_ten { dir = dir, config = lib.read(dir .. "/tenement.toml"), port = port }
  local t = lib.ten_wait_state(srv, "running", expected, 30, 0.05)
  if t then restored = restored + 1 restore_s[#restore_s + 1] = lib.now() - srv.started end
  local lines = lib.run(function()
    local conn = assert(core.db.open(dir .. "/data/tenement.db", { readonly = true }))
    local r = conn:query("SELECT count(*) AS n FROM log_lines")
    conn:close()
    return r and r[1].n
  end)
  lib.stop_ten(srv)
  local ob = {}
  for k, v in pairs(orphans_by) do ob[#ob + 1] = k .. ": " .. v end
  table.sort(ob)
  result("serve-kill", string.format("SIGKILL of ten serve under load, %d times (process and namespace instances, "
    .. "two of them forking)", cycles), orphan_total == 0,
    orphan_total == 0 and "no process of any instance outlived ten" or
      ("orphans left alive after ten died: " .. table.concat(ob, ", ")))
  result("serve-kill", string.format("restart after each kill restores all %d instances (one spawned through the API)",
    expected), restored == cycles + 1,
    string.format("%d of %d restarts restored every instance; slowest %.2f s", restored, cycles + 1,
      math.max(0, table.unpack(restore_s))))
  result("serve-kill", "PRAGMA integrity_check after each kill", integrity_ok == cycles,
    string.format("ok %d of %d times; %s log lines in the store at the end", integrity_ok, cycles, tostring(lines)))
end

---------------------------------------------------------------------------
-- conns

local function raise_nofile(n)
  lib.sh(string.format("prlimit --pid %d --nofile=%d:%d", core.proc.getpid(), n, n))
end

local function fd_count(pid)
  local ok, out = lib.sh("ls /proc/" .. pid .. "/fd | wc -l")
  return ok and tonumber(out:match("%d+")) or nil
end

local function conns()
  local dir = lib.tmpdir("stress-conns")
  local port = lib.free_port()
  local LIMIT, N = 4096, tonumber(os.getenv("STRESS_CONNS")) or 10000
  raise_nofile(N + 2000)
  local config = lib.ten_config { settings = base_settings(dir, port), services = { backend_service("api", dir) },
    tail = { "[instances]", 'api = ["a"]' } }
  local srv = lib.start_ten { dir = dir, config = config, port = port, ulimit_n = LIMIT }
  lib.at_exit(function() lib.stop_ten(srv) end)
  assert(lib.ten_wait_state(srv, "running", 1, 20))
  local fds0 = fd_count(srv.pid)
  local opened, answered, refused, errs = 0, 0, 0, {}
  local probes, probe_ok, probe_ms = 0, 0, {}
  local seen, control_ok, control_tries, probe_err = {}, 0, 0, {}
  local cpu_hold
  lib.run(function()
    local release = false
    local held = {}
    local tasks = {}
    for i = 1, N do
      tasks[i] = core.spawn(function()
        local c, err = core.net.connect { host = "127.0.0.1", port = port, timeout = 10000 }
        if not c then
          refused = refused + 1
          errs[tostring(err)] = (errs[tostring(err)] or 0) + 1
          return
        end
        opened = opened + 1
        held[#held + 1] = c
        c:write("GET / HTTP/1.1\r\nHost: a.api." .. DOMAIN .. "\r\n\r\n")
        local got = c:read(15000)
        if got and got:find("^HTTP/1.1 200") then answered = answered + 1 end
        local st = got and got:match("^HTTP/1.1 (%d+)") or "no answer in 15 s"
        seen[st] = (seen[st] or 0) + 1
        while not release do core.sleep(200) end
        c:close()
      end)
      if i % 500 == 0 then core.sleep(10) end
    end
    -- while they are held: is the server still answering a fresh client?
    local c0 = lib.cpu_seconds(srv.pid)
    local t0 = lib.now()
    for _ = 1, 40 do
      local p0 = core.hrtime()
      local res, perr = lib.get({ port = port }, "/health", { host = DOMAIN }, 3000)
      probes = probes + 1
      if res and res.status == 200 then
        probe_ok = probe_ok + 1
        probe_ms[#probe_ms + 1] = (core.hrtime() - p0) / 1e6
      else
        local k = res and tostring(res.status) or tostring(perr)
        probe_err[k] = (probe_err[k] or 0) + 1
      end
      if probes % 10 == 0 then
        control_tries = control_tries + 1
        local cres = core.http.request { path = srv.sock, method = "GET", target = "/health", timeout = 3000 }
        if cres and cres.status == 200 then control_ok = control_ok + 1 end
      end
      core.sleep(250)
    end
    cpu_hold = (lib.cpu_seconds(srv.pid) - c0) / (lib.now() - t0) * 100
    release = true
    for _, t in ipairs(tasks) do t:join(20000) end
  end)
  lib.sleep(2)
  -- afterwards: answers, and its descriptors are back
  local after = lib.run(function()
    local res = lib.get({ port = port }, "/", { host = "a.api." .. DOMAIN }, 5000)
    return res and res.status
  end)
  local fds1 = fd_count(srv.pid)
  local alive = lib.alive(srv.pid)
  local log = lib.read(srv.log) or ""
  lib.stop_ten(srv)
  local e, sn = {}, {}
  for k, v in pairs(errs) do e[#e + 1] = k .. ": " .. v end
  for k, v in pairs(seen) do sn[#sn + 1] = k .. ": " .. v end
  table.sort(sn)
  local pe = {}
  for k, v in pairs(probe_err) do pe[#pe + 1] = k .. ": " .. v end
  table.sort(pe)
  result("conns", string.format("%d concurrent connections to ten serve with ulimit -n %d (max_connections %d)", N, LIMIT,
    4096), alive and after == 200,
    string.format("%d connected, %d failed to connect (%s); what the held connections got: %s; ten alive: %s", opened,
      refused, table.concat(e, ", "), table.concat(sn, ", "), tostring(alive)))
  result("conns", "a fresh client every 250 ms while they are held (and the control socket every 2.5 s)",
    probe_ok == probes and control_ok == control_tries,
    string.format("%d of %d front-door probes answered (p50 %.1f ms, max %.1f ms)%s; control socket %d of %d", probe_ok,
      probes, lib.percentile(probe_ms, 50) or -1, lib.percentile(probe_ms, 100) or -1,
      #pe > 0 and (", failures: " .. table.concat(pe, ", ")) or "", control_ok, control_tries))
  -- a connection not accepted yet waits its turn (that is the back-off);
  -- one accepted and then answered 502 was failed for lack of descriptors
  result("conns", "connections accepted are served (none answered 502 for want of a descriptor)",
    (seen["502"] or 0) == 0, string.format("%d answered 200, %d answered 502, %d still waiting to be accepted after 15 s",
      seen["200"] or 0, seen["502"] or 0, seen["no answer in 15 s"] or 0))
  result("conns", "accepting backs off instead of spinning", cpu_hold < 50,
    string.format("ten used %.1f%% of a core while the connections were held", cpu_hold))
  -- up to upstream_keepalive (default 64) idle upstream connections may stay pooled
  result("conns", "descriptors released afterwards", fds1 ~= nil and fds1 <= fds0 + 64 + 5,
    string.format("%s fds before, %s after (64 may be pooled upstream connections); GET afterwards: %s; "
      .. "%d error lines in its log", tostring(fds0), tostring(fds1),
      tostring(after), select(2, log:gsub(" error ", ""))))
end

---------------------------------------------------------------------------
-- slowloris

local function slowloris()
  local dir = lib.tmpdir("stress-slow")
  local port = lib.free_port()
  local config = lib.ten_config { settings = base_settings(dir, port, { "header_timeout = 5" }),
    services = { backend_service("api", dir) }, tail = { "[instances]", 'api = ["a"]' } }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv) end)
  assert(lib.ten_wait_state(srv, "running", 1, 20))
  local N = 1000
  local cut, cut_s, still_open, conn_fail = 0, {}, 0, 0
  local ok_probes, probes = 0, 0
  local c0 = lib.cpu_seconds(srv.pid)
  local t_start = lib.now()
  lib.run(function()
    local tasks = {}
    for i = 1, N do
      tasks[i] = core.spawn(function()
        local c = core.net.connect { host = "127.0.0.1", port = port, timeout = 5000 }
        if not c then conn_fail = conn_fail + 1 return end
        local t0 = lib.now()
        c:write("GET / HTTP/1.1\r\nHost: a.api." .. DOMAIN .. "\r\n")
        local closed = false
        for k = 1, 40 do -- a header line every 500 ms: 20 s if nobody cuts it
          local ok = c:write("X-Slow-" .. k .. ": " .. string.rep("a", 5) .. "\r\n")
          if not ok then closed = true break end
          local got, err = c:read(500)
          if got == nil and err == nil then closed = true break end -- EOF
          if got then closed = true break end -- a 408 and then EOF
          if err and err ~= "timeout" then closed = true break end
        end
        if closed then
          cut = cut + 1
          cut_s[#cut_s + 1] = lib.now() - t0
        else
          still_open = still_open + 1
        end
        c:close()
      end)
    end
    for _ = 1, 30 do
      local res = lib.get({ port = port }, "/", { host = "a.api." .. DOMAIN }, 3000)
      probes = probes + 1
      if res and res.status == 200 then ok_probes = ok_probes + 1 end
      core.sleep(400)
    end
    for _, t in ipairs(tasks) do t:join(30000) end
  end)
  local cpu = (lib.cpu_seconds(srv.pid) - c0) / (lib.now() - t_start) * 100
  lib.stop_ten(srv)
  result("slowloris", string.format("%d connections sending one header line every 500 ms (header_timeout = 5)", N),
    still_open == 0 and (lib.percentile(cut_s, 100) or 99) < 8,
    string.format("%d cut (median after %.1f s, last after %.1f s), %d never cut, %d could not connect; ten at %.1f%% CPU",
      cut, lib.percentile(cut_s, 50) or -1, lib.percentile(cut_s, 100) or -1, still_open, conn_fail, cpu))
  result("slowloris", "ordinary requests meanwhile", ok_probes == probes,
    string.format("%d of %d answered 200", ok_probes, probes))
end

---------------------------------------------------------------------------
-- malformed

local H = "Host: a.api." .. DOMAIN .. "\r\n"
local CORPUS = {
  -- name, raw request, expectation: "4xx" (a 4xx answer or a close without 2xx), or "ok" (2xx allowed)
  { "CL and TE together", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nX", "4xx" },
  { "two different Content-Length", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", "4xx" },
  { "Content-Length list", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: 1, 2\r\n\r\nab", "4xx" },
  { "negative Content-Length", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: -1\r\n\r\n", "4xx" },
  { "Content-Length with a sign", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: +3\r\n\r\nabc", "4xx" },
  { "Content-Length overflow", "POST /echo HTTP/1.1\r\n" .. H .. "Content-Length: 99999999999999999999999\r\n\r\n", "4xx" },
  { "TE gzip, chunked", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "4xx" },
  { "TE chunked twice", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "4xx" },
  { "TE with a space before the colon", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", "4xx" },
  { "TE xchunked", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", "4xx" },
  { "TE in HTTP/1.0", "POST /echo HTTP/1.0\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "4xx" },
  { "bad chunk size", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "4xx" },
  { "chunk size overflow", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nx\r\n", "4xx" },
  { "chunk without CRLF after data", "POST /echo HTTP/1.1\r\n" .. H .. "Transfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", "4xx" },
  { "obsolete line folding", "GET /echo HTTP/1.1\r\n" .. H .. "X-A: one\r\n two\r\n\r\n", "4xx" },
  { "bare LF line ends", "GET /echo HTTP/1.1\n" .. H:gsub("\r", "") .. "\n", "4xx" },
  { "space before colon", "GET /echo HTTP/1.1\r\n" .. H .. "X-A : b\r\n\r\n", "4xx" },
  { "NUL in a header value", "GET /echo HTTP/1.1\r\n" .. H .. "X-A: a\0b\r\n\r\n", "4xx" },
  { "CR inside a header value", "GET /echo HTTP/1.1\r\n" .. H .. "X-A: a\rb\r\n\r\n", "4xx" },
  { "HTTP/2.0 request line", "GET / HTTP/2.0\r\n" .. H .. "\r\n", "4xx" },
  { "HTTP/1.2", "GET / HTTP/1.2\r\n" .. H .. "\r\n", "4xx" },
  { "HTTP/0.9 style", "GET /\r\n\r\n", "4xx" },
  { "HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "4xx" },
  { "bad method token", "G@T / HTTP/1.1\r\n" .. H .. "\r\n", "4xx" },
  { "lower-case version", "GET / http/1.1\r\n" .. H .. "\r\n", "4xx" },
  -- RFC 9112 3: a recipient MAY parse the request line on white space: either answer holds
  { "two spaces in the request line", "GET  / HTTP/1.1\r\n" .. H .. "\r\n", "any" },
  { "control character in the target", "GET /a\1b HTTP/1.1\r\n" .. H .. "\r\n", "4xx" },
  { "no Host in HTTP/1.1", "GET / HTTP/1.1\r\n\r\n", "4xx" },
  { "two Host headers", "GET / HTTP/1.1\r\n" .. H .. H .. "\r\n", "4xx" },
  { "Host with a space", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "4xx" },
  { "128 KiB request target", "GET /" .. string.rep("a", 128 * 1024) .. " HTTP/1.1\r\n" .. H .. "\r\n", "4xx" },
  { "64 KiB header", "GET / HTTP/1.1\r\n" .. H .. "X-Big: " .. string.rep("b", 64 * 1024) .. "\r\n\r\n", "4xx" },
  { "500 headers", "GET / HTTP/1.1\r\n" .. H .. string.rep("X-N: 1\r\n", 500) .. "\r\n", "4xx" },
  { "body larger than max_body", "POST /sink HTTP/1.1\r\n" .. H .. "Content-Length: 50000000000\r\n\r\nabc", "4xx" },
  { "TLS ClientHello", "\22\3\1\0\165\1\0\0\161\3\3" .. string.rep("\0", 40), "4xx" },
  { "empty lines only", "\r\n\r\n\r\n", "4xx" },
  { "random bytes", (function()
      local t = {}
      math.randomseed(3)
      for i = 1, 512 do t[i] = string.char(math.random(0, 255)) end
      return table.concat(t)
    end)(), "4xx" },
  { "smuggled request after a complete one", "GET / HTTP/1.1\r\n" .. H .. "Content-Length: 0\r\n\r\nGARBAGE\r\n\r\n", "ok" },
  { "Expect: 100-continue with a too large body", "POST /sink HTTP/1.1\r\n" .. H .. "Expect: 100-continue\r\n"
    .. "Content-Length: 20000000\r\n\r\n", "4xx" },
  { "valid request (control)", "GET / HTTP/1.1\r\n" .. H .. "Connection: close\r\n\r\n", "ok" },
}

local function malformed()
  local dir = lib.tmpdir("stress-malformed")
  local port = lib.free_port()
  local config = lib.ten_config { settings = base_settings(dir, port, { "header_timeout = 3", "keepalive_timeout = 3" }),
    services = { backend_service("api", dir, { health = false }) }, tail = { "[instances]", 'api = ["a"]' } }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv) end)
  assert(lib.ten_wait_state(srv, "running", 1, 20))
  local count0 = lib.run(function()
    local res = lib.get({ port = port }, "/count", { host = "a.api." .. DOMAIN }, 5000)
    return tonumber(res and res.body)
  end)
  local held, total, crashed = 0, 0, false
  for _, case in ipairs(CORPUS) do
    local name, raw, want = case[1], case[2], case[3]
    local got = lib.run(function()
      local c = core.net.connect { host = "127.0.0.1", port = port, timeout = 3000 }
      if not c then return "no connection" end
      c:write(raw)
      local buf = {}
      local t0 = lib.now()
      while lib.now() - t0 < 6 do
        local chunk, err = c:read(6000)
        if not chunk then break end
        buf[#buf + 1] = chunk
        if err then break end
      end
      c:close()
      return table.concat(buf)
    end)
    local statuses = {}
    for st in got:gmatch("HTTP/1%.%d (%d%d%d)") do statuses[#statuses + 1] = tonumber(st) end
    local first = statuses[1]
    local ok
    if want == "any" then
      ok = true
    elseif want == "ok" then
      ok = first ~= nil and first < 300
      if name:find("smuggled", 1, true) then ok = ok and (statuses[2] == nil or statuses[2] >= 400) end
    else
      ok = first == nil or first >= 400
      for _, st in ipairs(statuses) do if st < 400 and st ~= 100 then ok = false end end
    end
    if not lib.alive(srv.pid) then crashed = true ok = false end
    total = total + 1
    if ok then held = held + 1 end
    corpus_rows[#corpus_rows + 1] = { request = name,
      expected = want == "ok" and "2xx" or want == "any" and "2xx or 4xx" or "4xx or close",
      got = #statuses > 0 and table.concat(statuses, ", ") or "closed, no answer", held = ok }
    if crashed then break end
  end
  -- no malformed request may have reached the backend: it counts what it saw
  local count1 = lib.run(function()
    local res = lib.get({ port = port }, "/count", { host = "a.api." .. DOMAIN }, 5000)
    return tonumber(res and res.body)
  end)
  local oks = 0
  for i, case in ipairs(CORPUS) do
    local row = corpus_rows[i]
    if case[3] == "ok" or (case[3] == "any" and row and row.got:match("^2")) then oks = oks + 1 end
  end
  local passed = count1 and count0 and (count1 - count0 - 1) or -1
  lib.stop_ten(srv)
  result("malformed", string.format("%d raw requests (smuggling, framing, limits, garbage)", total),
    held == total and not crashed, string.format("%d of %d answered as expected (table below); ten %s", held, total,
      crashed and "CRASHED" or "stayed up"))
  result("malformed", "nothing malformed reached the backend", passed == oks,
    string.format("the backend saw %d request(s) from the corpus; the %d well-formed ones only", passed, oks))
end

---------------------------------------------------------------------------
-- fuzz

local function fuzz()
  local dir = os.getenv("FUZZ_DIR") or (lib.build .. "/fuzz")
  local seconds = tonumber(os.getenv("FUZZ_SECONDS")) or 60
  if not io.open(dir .. "/head_fuzz") then lib.must("sh bench/fuzz/build.sh " .. lib.q(dir)) end
  local ok, out = lib.sh(string.format("sh bench/fuzz/run.sh %s %d http head toml", lib.q(dir), seconds))
  for _, t in ipairs { "http", "head", "toml" } do
    local s = lib.read(dir .. "/summary-" .. t .. ".txt") or ""
    local r = {}
    for k, v in s:gmatch("(%w+)=(%S+)") do r[k] = v end
    result("fuzz", string.format("libFuzzer + ASan, target %s, %s s", t, r.seconds or "?"), r.result == "ok",
      string.format("%s inputs run, corpus %s, %s crash artifacts%s", r.execs or "?", r.corpus or "?", r.artifacts or "?",
        r.result == "ok" and "" or (" (" .. (r.result or "no summary") .. ")")))
  end
  if not ok then lib.log("fuzz: %s", out:sub(-2000)) end
end

---------------------------------------------------------------------------

local TESTS = { kill9 = kill9, ["serve-kill"] = serve_kill, conns = conns, slowloris = slowloris, malformed = malformed,
  fuzz = fuzz }

local function main(args)
  local names = {}
  for _, a in ipairs(args) do for w in a:gmatch("[%w%-]+") do names[#names + 1] = w end end
  if #names == 0 then for w in (os.getenv("STRESS") or ""):gmatch("[%w%-]+") do names[#names + 1] = w end end
  if #names == 0 then names = ALL end
  local t0 = lib.now()
  local load_before = lib.loadavg()
  for _, name in ipairs(names) do
    local fn = TESTS[name] or error("no stress test " .. name)
    lib.log("== stress %s", name)
    local ok, err = xpcall(fn, debug.traceback)
    lib.cleanup()
    if not ok then result(name, "(the test itself failed)", false, tostring(err):gsub("\n", " "):sub(1, 600)) end
  end
  -- tests not run this time keep their rows from the last run
  local ran = {}
  for _, n in ipairs(names) do ran[n] = true end
  local prev = report.load().sections.stress
  if prev and prev.tables then
    local kept = {}
    for _, r in ipairs(prev.tables[1] and prev.tables[1].rows or {}) do
      if not ran[r.test] then kept[#kept + 1] = r end
    end
    for _, r in ipairs(rows) do kept[#kept + 1] = r end
    local order = {}
    for i, n in ipairs(ALL) do order[n] = i end
    for i, r in ipairs(kept) do r._i = i end
    table.sort(kept, function(a, b)
      local oa, ob = order[a.test] or 99, order[b.test] or 99
      if oa ~= ob then return oa < ob end
      return a._i < b._i
    end)
    for _, r in ipairs(kept) do r._i = nil end
    rows = kept
    if not ran.malformed and prev.tables[2] then corpus_rows = prev.tables[2].rows or {} end
  end
  local held = 0
  for _, r in ipairs(rows) do if r.held then held = held + 1 end end
  local section = {
    title = "Stress",
    seconds = lib.round(lib.now() - t0, 1),
    load = { before = load_before, after = lib.loadavg() },
    goals = { { goal = "every stress check holds", value = string.format("%d of %d held", held, #rows),
      met = held == #rows, detail = "tests run this time: " .. table.concat(names, ", ") } },
    tables = {
      { title = "What ran and what held", columns = { "test", "ran", "held", "detail" }, rows = rows },
      { title = "Malformed-request corpus", columns = { "request", "expected", "got", "held" }, rows = corpus_rows },
    },
    notes = { "Loopback only; every process started here is stopped by pid (and anything carrying this run's "
      .. "BENCH_MARK in its environment is killed at the end)." },
    versions = { ten = lib.ten_version(), clang = (select(2, lib.sh("clang-14 --version")):match("version ([%d.]+)")) },
  }
  report.merge { stress = section }
  report.render()
  return held == #rows and 0 or 1
end

local ok, code = xpcall(main, debug.traceback, arg)
lib.cleanup()
if not ok then
  io.stderr:write(tostring(code), "\n")
  os.exit(1)
end
os.exit(code)
