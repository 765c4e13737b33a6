-- Shared helpers of the benchmarks and the stress suite: processes started
-- and stopped by pid, /proc readings, peers from Debian, wrk, ten serve.
--
-- Run from the repository root with LUA_PATH="bench/?.lua;lua/?.lua;;" and
-- LUA_CPATH="$(BUILD)/lib/?.so;;" (the Makefile sets both).
local core = require "tenement.core"
local cjson = require "cjson"

local lib = {}

-- The runtime drivers live in runtimes/ but are named tenement.runtimes.NAME,
-- as in the ten binary (the same searcher as spec/helper.lua).
table.insert(package.searchers, 2, function(name)
  local rel = name:match("^tenement%.runtimes%.(.+)$")
  if not rel then return nil end
  local path = "runtimes/" .. rel:gsub("%.", "/") .. ".lua"
  local f = io.open(path)
  if not f then return "\n\tno file '" .. path .. "'" end
  f:close()
  return assert(loadfile(path)), path
end)

lib.build = os.getenv("BUILD") or "build"
lib.root = os.getenv("PWD") or "."

local function abs(p)
  if p:sub(1, 1) == "/" then return p end
  return lib.root .. "/" .. p
end
lib.abs = abs
lib.ten = abs(lib.build .. "/ten")
lib.backend = abs(lib.build .. "/fixtures/backend")
lib.flood = abs(lib.build .. "/fixtures/flood")
lib.forkn = abs(lib.build .. "/fixtures/forkn")
lib.bench_bin = abs(lib.build .. "/bench")

-- A unique mark for every process a run starts (in its environment), so the
-- cleanup finds exactly ours and nothing else.
lib.mark = string.format("tenbench-%d-%d", os.time(), math.random(1, 1e9))

---------------------------------------------------------------------------
-- shell and files

function lib.q(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

-- lib.sh(cmd) -> ok, output (stdout and stderr), exit code
function lib.sh(cmd)
  local p = io.popen("(" .. cmd .. ") 2>&1", "r")
  local out = p:read("a")
  local ok, _, code = p:close()
  return ok == true, out, code
end

function lib.must(cmd)
  local ok, out, code = lib.sh(cmd)
  if not ok then error(string.format("command failed (%s): %s\n%s", tostring(code), cmd, out), 2) end
  return out
end

function lib.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

function lib.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

local tmpdirs = {}
function lib.tmpdir(tag)
  local base = os.getenv("TMPDIR") or "/tmp"
  local dir = lib.must("mktemp -d " .. lib.q(base .. "/tenbench-" .. (tag or "x") .. ".XXXXXX")):gsub("%s+$", "")
  tmpdirs[#tmpdirs + 1] = dir
  return dir
end

function lib.now() return core.hrtime() / 1e9 end

function lib.sleep(seconds)
  if core.current() then
    core.sleep(math.floor(seconds * 1000))
  else
    core.run(function() core.sleep(math.floor(seconds * 1000)) end)
  end
end

-- Runs fn inside a task (a fresh loop run) unless already inside one.
function lib.run(fn, ...)
  if core.current() then return fn(...) end
  return core.run(fn, ...)
end

function lib.log(fmt, ...)
  io.stderr:write(os.date("%H:%M:%S "), string.format(fmt, ...), "\n")
  io.stderr:flush()
end

-- Compiles bench/apps/NAME.c into BUILD/bench/NAME (when older), with cc or
-- the one given, into the file named as (default NAME). -> path
function lib.compile(name, flags, compiler, as, libs)
  local src = lib.root .. "/bench/apps/" .. name .. ".c"
  local out = lib.bench_bin .. "/" .. (as or name:gsub("_", "-"))
  local ok = lib.sh(string.format("test %s -nt %s", lib.q(out), lib.q(src)))
  if not ok then
    lib.must(string.format("mkdir -p %s && %s -std=c11 -O2 -Wall -Wextra -Werror -D_GNU_SOURCE %s -o %s %s %s",
      lib.q(lib.bench_bin), compiler or "cc", flags or "", lib.q(out), lib.q(src), libs or ""))
  end
  return out
end

function lib.loadavg()
  return ((lib.read("/proc/loadavg") or ""):match("^(%S+ %S+ %S+)"))
end

---------------------------------------------------------------------------
-- statistics

function lib.percentile(list, p)
  if #list == 0 then return nil end
  local s = {}
  for i, v in ipairs(list) do s[i] = v end
  table.sort(s)
  local idx = math.max(1, math.min(#s, math.ceil(p / 100 * #s)))
  return s[idx]
end

function lib.mean(list)
  if #list == 0 then return nil end
  local t = 0
  for _, v in ipairs(list) do t = t + v end
  return t / #list
end

function lib.round(x, digits)
  if x == nil then return nil end
  local m = 10 ^ (digits or 0)
  local r = math.floor(x * m + 0.5) / m
  if (digits or 0) == 0 then return math.tointeger(r) or r end
  return r
end

---------------------------------------------------------------------------
-- /proc

local CLK_TCK = tonumber((select(2, lib.sh("getconf CLK_TCK")) or ""):match("%d+")) or 100
lib.CLK_TCK = CLK_TCK

local function stat_fields(pid)
  local s = lib.read("/proc/" .. pid .. "/stat")
  if not s then return nil end
  -- pid (comm) state ...: comm may hold spaces and parentheses
  local rest = s:match("^%d+ %(.*%) (.*)$")
  if not rest then return nil end
  local f = {}
  for w in rest:gmatch("%S+") do f[#f + 1] = w end
  return f -- f[1] is field 3 (state)
end

-- CPU seconds (user + system) a process has used so far, all its threads.
function lib.cpu_seconds(pid)
  local f = stat_fields(pid)
  if not f then return nil end
  return (tonumber(f[12]) + tonumber(f[13])) / CLK_TCK -- fields 14 and 15
end

function lib.cpu_sum(pids)
  local t = 0
  for _, pid in ipairs(pids) do t = t + (lib.cpu_seconds(pid) or 0) end
  return t
end

function lib.ppid(pid)
  local f = stat_fields(pid)
  return f and tonumber(f[2])
end

function lib.state(pid)
  local f = stat_fields(pid)
  return f and f[1]
end

function lib.alive(pid)
  local st = lib.state(pid)
  return st ~= nil and st ~= "Z" and st ~= "X"
end

local function status_kb(pid, key)
  local s = lib.read("/proc/" .. pid .. "/status")
  return s and tonumber(s:match(key .. ":%s+(%d+) kB"))
end

function lib.rss_kb(pid) return status_kb(pid, "VmRSS") end
function lib.hwm_kb(pid) return status_kb(pid, "VmHWM") end

function lib.pss_kb(pid)
  local s = lib.read("/proc/" .. pid .. "/smaps_rollup")
  return s and tonumber(s:match("\nPss:%s+(%d+) kB"))
end

-- ten serve's own processes: itself and its keeper (tenement-keeper, a
-- child of its own that outlives it only to clean up), whose memory and CPU
-- count as ten's.
function lib.ten_pids(pid)
  local out = { pid }
  for _, e in ipairs(lib.all_pids()) do
    if e.ppid == pid and (lib.read("/proc/" .. e.pid .. "/comm") or ""):match("^tenement%-keeper") then
      out[#out + 1] = e.pid
    end
  end
  return out
end

function lib.sum_kb(fn, pids)
  local t = 0
  for _, p in ipairs(pids) do t = t + (fn(p) or 0) end
  return t
end

-- Every pid on the machine, with its parent.
function lib.all_pids()
  local out = {}
  local p = io.popen("ls /proc")
  for name in p:lines() do
    if name:match("^%d+$") then
      local pp = lib.ppid(name)
      if pp then out[#out + 1] = { pid = tonumber(name), ppid = pp } end
    end
  end
  p:close()
  return out
end

-- pid -> list of its children, for the whole machine, read once.
function lib.children_map()
  local kids = {}
  for _, e in ipairs(lib.all_pids()) do
    kids[e.ppid] = kids[e.ppid] or {}
    table.insert(kids[e.ppid], e.pid)
  end
  return kids
end

-- Descendants of pid (not pid itself); kids: a children_map() to reuse.
function lib.descendants(pid, kids)
  kids = kids or lib.children_map()
  local out, queue = {}, { pid }
  while #queue > 0 do
    local p = table.remove(queue)
    for _, c in ipairs(kids[p] or {}) do
      out[#out + 1] = c
      queue[#queue + 1] = c
    end
  end
  return out
end

-- Pids whose environment holds BENCH_MARK=mark: every process this run
-- started, wherever it was reparented.
function lib.marked(mark)
  mark = mark or lib.mark
  local needle = "BENCH_MARK=" .. mark
  local out = {}
  local p = io.popen("ls /proc")
  for name in p:lines() do
    if name:match("^%d+$") then
      local env = lib.read("/proc/" .. name .. "/environ")
      if env and env:find(needle, 1, true) and lib.alive(name) then out[#out + 1] = tonumber(name) end
    end
  end
  p:close()
  return out
end

-- CPU seconds the whole machine has been busy (all CPUs; /proc/stat).
function lib.machine_busy()
  local line = (lib.read("/proc/stat") or ""):match("^cpu%s+([^\n]+)")
  local f = {}
  for w in line:gmatch("%d+") do f[#f + 1] = tonumber(w) end
  -- user nice system idle iowait irq softirq steal
  return (f[1] + f[2] + f[3] + f[6] + f[7] + (f[8] or 0)) / CLK_TCK
end

function lib.meminfo()
  local s = lib.read("/proc/meminfo")
  local m = {}
  for k, v in s:gmatch("([%w_()]+):%s+(%d+)") do m[k] = tonumber(v) end
  return m
end

-- Memory in use on the whole machine (kB): MemTotal - MemAvailable.
function lib.machine_used_kb()
  local m = lib.meminfo()
  return m.MemTotal - m.MemAvailable
end

function lib.machine()
  local m = lib.meminfo()
  local cpu = (lib.read("/proc/cpuinfo") or ""):match("model name%s*:%s*([^\n]+)") or "?"
  local _, kernel = lib.sh("uname -r")
  local _, ncpu = lib.sh("nproc")
  return {
    cpus = tonumber(ncpu:match("%d+")), cpu_model = cpu, mem_mb = m.MemTotal // 1024,
    kernel = kernel:gsub("%s+$", ""),
    os = ((lib.read("/etc/os-release") or ""):match('PRETTY_NAME="([^"]+)"') or "?"),
  }
end

---------------------------------------------------------------------------
-- processes we start

local started = {}   -- pid -> description, stopped at exit if still alive

-- lib.start(cmd, log) -> pid: cmd runs in the background under sh (exec'd,
-- so the pid is the program's), stdout and stderr to log.
function lib.start(cmd, logfile, what)
  local line = string.format("exec %s >%s 2>&1 </dev/null", cmd, lib.q(logfile or "/dev/null"))
  local p = io.popen("sh -c " .. lib.q(line) .. " & echo $!")
  local pid = tonumber(p:read("l"))
  p:close()
  started[pid] = what or cmd
  return pid
end

-- Waits until pid is gone (up to timeout seconds). -> true | false
function lib.wait_gone(pid, timeout)
  local deadline = lib.now() + (timeout or 10)
  while lib.now() < deadline do
    if not lib.alive(pid) then return true end
    lib.sleep(0.02)
  end
  return not lib.alive(pid)
end

-- Stops pid: sig (default TERM), then KILL after grace seconds.
function lib.stop(pid, sig, grace)
  if not pid then return end
  core.proc.kill(pid, sig or "SIGTERM")
  if not lib.wait_gone(pid, grace or 10) then
    core.proc.kill(pid, "SIGKILL")
    lib.wait_gone(pid, 5)
  end
  started[pid] = nil
end

function lib.forget(pid) started[pid] = nil end

local cleanups = {}
function lib.at_exit(fn) cleanups[#cleanups + 1] = fn end

function lib.cleanup()
  for i = #cleanups, 1, -1 do pcall(cleanups[i]) end
  cleanups = {}
  for pid in pairs(started) do
    if lib.alive(pid) then core.proc.kill(pid, "SIGKILL") end
  end
  started = {}
  -- anything of ours that outlived its supervisor
  for _, pid in ipairs(lib.marked()) do core.proc.kill(pid, "SIGKILL") end
  if os.getenv("BENCH_KEEP") ~= "1" then
    for _, d in ipairs(tmpdirs) do os.execute("rm -rf " .. lib.q(d)) end
    tmpdirs = {}
  end
end

-- The machine's own stalls: a stall probe (bench/apps/stall_probe.c) on
-- each CPU sleeps 1 ms at a time for `seconds` and counts the sleeps that
-- ended late. Run beside nothing else: running it during a measurement
-- would wake each CPU every millisecond and change what is measured.
-- lib.stalls(phase, seconds) -> one row per CPU
function lib.stalls(phase, seconds)
  local probe = lib.compile("stall_probe")
  local _, out = lib.sh("nproc")
  local dir, probes = lib.tmpdir("stalls"), {}
  for cpu = 0, (tonumber(out:match("%d+")) or 1) - 1 do
    local log = dir .. "/cpu" .. cpu .. ".out"
    local pid = lib.start(string.format("taskset -c %d %s", cpu, lib.q(probe)), log, "stall probe")
    probes[#probes + 1] = { cpu = cpu, pid = pid, log = log }
  end
  lib.sleep(seconds)
  local rows = {}
  for _, p in ipairs(probes) do
    lib.stop(p.pid, "SIGTERM", 5)
    local text = lib.read(p.log) or ""
    local row = { phase = phase, cpu = p.cpu }
    for k, v in text:gmatch("(%a[%w_]*) ([%d.]+)") do row[k] = tonumber(v) end
    if not row.sleeps then error("the stall probe on CPU " .. p.cpu .. " printed nothing: " .. text) end
    rows[#rows + 1] = row
  end
  return rows
end

-- Over the rows of lib.stalls: stalls > 2 ms per CPU-second, and a sentence.
function lib.stalls_rate(rows)
  local over2, over5, worst, cpu_s = 0, 0, 0, 0
  for _, r in ipairs(rows) do
    over2, over5 = over2 + r.over_2ms, over5 + r.over_5ms
    worst, cpu_s = math.max(worst, r.max_ms), cpu_s + r.seconds
  end
  local rate = cpu_s > 0 and over2 / cpu_s or 0
  return rate, string.format("with nothing else running, a 1 ms sleep ended > 2 ms late %d times in %.0f CPU-seconds "
    .. "(%.1f per CPU-second; > 5 ms: %d; longest %.1f ms)", over2, cpu_s, rate, over5, worst)
end

---------------------------------------------------------------------------
-- peers from Debian

-- Installs the Debian packages that are missing (apt-get, as root).
function lib.ensure_packages(pkgs)
  local missing = {}
  for _, p in ipairs(pkgs) do
    local ok, out = lib.sh("dpkg-query -W -f='${Status}' " .. p)
    if not ok or not out:find("install ok installed", 1, true) then missing[#missing + 1] = p end
  end
  if #missing == 0 then return true end
  lib.log("installing from Debian: %s", table.concat(missing, " "))
  local ok, out = lib.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
    .. table.concat(missing, " "))
  if not ok then
    lib.sh("apt-get update -qq")
    ok, out = lib.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
      .. table.concat(missing, " "))
  end
  if not ok then error("apt-get install " .. table.concat(missing, " ") .. " failed:\n" .. out) end
  return true
end

function lib.pkg_version(pkg)
  local ok, out = lib.sh("dpkg-query -W -f='${Version}' " .. pkg)
  return ok and out ~= "" and out or "?"
end

function lib.ten_version()
  return (core.version or "?") .. " (" .. (select(2, lib.sh("git rev-parse --short HEAD")) or "?"):gsub("%s+$", "")
    .. (select(2, lib.sh("git status --porcelain -- c lua runtimes")) ~= "" and "+dirty" or "") .. ")"
end

---------------------------------------------------------------------------
-- HTTP (inside a task)

-- GET through TCP host/port, or a Unix socket path. -> res | nil, err
function lib.get(where, target, headers, timeout)
  local opts = { method = "GET", target = target or "/", headers = headers or {}, timeout = timeout or 10000 }
  if where.path then opts.path = where.path else opts.host, opts.port = where.host or "127.0.0.1", where.port end
  return core.http.request(opts)
end

---------------------------------------------------------------------------
-- ten serve

-- lib.ten_config{ settings = {lines}, services = { {name=, lines = {...}} }, tail = {lines} } -> text
function lib.ten_config(c)
  local out = { "[settings]" }
  for _, l in ipairs(c.settings or {}) do out[#out + 1] = l end
  for _, s in ipairs(c.services or {}) do
    out[#out + 1] = "[service." .. s.name .. "]"
    for _, l in ipairs(s.lines) do out[#out + 1] = l end
    out[#out + 1] = "[service." .. s.name .. ".env]"
    out[#out + 1] = string.format("BENCH_MARK = %q", lib.mark)
    for k, v in pairs(s.env or {}) do out[#out + 1] = string.format("%s = %q", k, v) end
  end
  for _, l in ipairs(c.tail or {}) do out[#out + 1] = l end
  return table.concat(out, "\n") .. "\n"
end

-- lib.start_ten{ dir=, config=text, prefix="taskset -c 0", ulimit_n= } -> srv
function lib.start_ten(o)
  local cfg = lib.write(o.dir .. "/tenement.toml", o.config)
  local log = o.dir .. "/serve.log"
  local cmd = string.format("env -i PATH=/usr/local/bin:/usr/bin:/bin BENCH_MARK=%s %s %s serve --config %s",
    lib.mark, o.prefix or "", lib.q(lib.ten), lib.q(cfg))
  if o.ulimit_n then cmd = string.format("sh -c %s", lib.q("ulimit -n " .. o.ulimit_n .. " && exec " .. cmd)) end
  local t0 = lib.now()
  local pid = lib.start(cmd, log, "ten serve")
  local data_dir = o.config:match('\ndata_dir = "([^"]+)"') or (o.dir .. "/data")
  local srv = { pid = pid, dir = o.dir, cfg = cfg, log = log, sock = data_dir .. "/ten.sock",
    started = t0, port = o.port, domain = o.config:match('\ndomain = "([^"]+)"') or "localhost" }
  -- up once the control socket answers
  local deadline = lib.now() + (o.timeout or 30)
  while lib.now() < deadline do
    if not lib.alive(pid) then error("ten serve exited:\n" .. (lib.read(log) or "")) end
    local ok = lib.run(function()
      local res = lib.get({ path = srv.sock }, "/health", nil, 1000)
      return res and res.status == 200
    end)
    if ok then srv.up = lib.now() return srv end
    lib.sleep(0.02)
  end
  error("ten serve did not answer on " .. srv.sock .. ":\n" .. (lib.read(log) or ""))
end

-- cjson decodes every number as a float: integral ones become integers.
function lib.ints(v)
  if type(v) == "table" then
    for k, x in pairs(v) do v[k] = lib.ints(x) end
  elseif type(v) == "number" then
    return math.tointeger(v) or v
  end
  return v
end

-- The control API over the Unix socket (no token needed there).
function lib.ten_api(srv, method, target, body, timeout)
  return lib.run(function()
    local res, err = core.http.request { path = srv.sock, method = method, target = target,
      headers = body and { ["content-type"] = "application/json" } or {}, body = body,
      timeout = timeout or 30000 }
    if not res then return nil, err end
    local ok, data = pcall(cjson.decode, res.body)
    return ok and lib.ints(data) or res.body, res.status
  end)
end

function lib.ten_counts(srv)
  local h = lib.ten_api(srv, "GET", "/health", nil, 5000)
  return type(h) == "table" and h.instances or {}
end

function lib.ten_instances(srv)
  local list = lib.ten_api(srv, "GET", "/api/instances")
  return type(list) == "table" and list or {}
end

-- Waits until `n` instances are in `state` (seconds). -> elapsed | nil
function lib.ten_wait_state(srv, state, n, timeout, poll)
  local t0 = lib.now()
  while lib.now() - t0 < (timeout or 60) do
    local c = lib.ten_counts(srv)
    if (c[state] or 0) >= n then return lib.now() - t0 end
    lib.sleep(poll or 0.05)
  end
  return nil
end

function lib.metrics(srv)
  return lib.run(function()
    local res = lib.get({ host = "127.0.0.1", port = srv.port }, "/metrics", { host = srv.domain or "localhost" }, 10000)
    return res and res.body or ""
  end)
end

-- The value of one sample in a Prometheus text body (labels as written).
function lib.metric(body, name)
  local total, found = 0, false
  for line in body:gmatch("[^\n]+") do
    if line:sub(1, #name) == name and (line:sub(#name + 1, #name + 1) == " " or line:sub(#name + 1, #name + 1) == "{") then
      local v = tonumber(line:match("%s(%S+)$"))
      if v then total = total + v found = true end
    end
  end
  return found and total or nil
end

function lib.stop_ten(srv, grace)
  if srv and srv.pid then lib.stop(srv.pid, "SIGTERM", grace or 30) end
end

function lib.free_port()
  return lib.run(function()
    local l = assert(core.net.listen { host = "127.0.0.1", port = 0 })
    local port = l:port()
    l:close()
    return port
  end)
end

---------------------------------------------------------------------------
-- wrk

lib.wrk_script = abs("bench/wrk/report.lua")

-- lib.wrk{ url=, conns=, seconds=, cpu=, host=, script=, timeout= } -> result, command
-- result: requests, duration_s, rps, p50_us, p99_us, errors (connect/read/write/status/timeout)
function lib.wrk(o)
  local cmd = string.format("%swrk -t1 -c%d -d%ds --timeout %ds -s %s %s%s",
    o.cpu and ("taskset -c " .. o.cpu .. " ") or "", o.conns, o.seconds, o.timeout or 5,
    lib.q(o.script or lib.wrk_script), o.host and ("-H " .. lib.q("Host: " .. o.host) .. " ") or "", o.url)
  -- the shell's own stat, after wrk was reaped, holds wrk's CPU time as cutime + cstime
  local ok, out = lib.sh("sh -c " .. lib.q(cmd .. "; cat /proc/$$/stat"))
  local json = out:match("WRKJSON (%b{})")
  if not json then error("wrk gave no result (" .. tostring(ok) .. "): " .. cmd .. "\n" .. out) end
  local r = lib.ints(cjson.decode(json))
  local stat = out:match("\n(%d+ %(.-%) [^\n]*)%s*$")
  if stat then
    local f = {}
    for w in stat:match("^%d+ %(.*%) (.*)$"):gmatch("%S+") do f[#f + 1] = w end
    r.wrk_cpu_s = (tonumber(f[14]) + tonumber(f[15])) / CLK_TCK -- fields 16 and 17
  end
  r.rps = r.requests / (r.duration_us / 1e6)
  r.duration_s = r.duration_us / 1e6
  return r, cmd
end

lib.json = cjson
return lib
