-- Density: what a thousand services cost the supervisor.
--   (a) ten serve with 1000 services configured and none running: its RSS,
--       against the same server with one service;
--   (b) 1000 running backend fixtures (isolation "process", health checks
--       every 10 s): time until all answer, the supervisor's memory, its idle
--       CPU; against supervisord and s6-svscan supervising the same 1000
--       processes on the same Unix sockets.
-- "All answer" is checked the same way for every peer: this script connects
-- to each socket and needs a 200 to GET /health.
local core = require "tenement.core"
local lib = require "lib"

local M = { name = "density", title = "Density: 1000 services" }

local N = tonumber(os.getenv("BENCH_DENSITY_N")) or 1000

-- Waits until every socket answers GET /health with 200. -> seconds | nil
local function wait_all_answer(sockets, t0, timeout)
  local pending = {}
  for i, s in ipairs(sockets) do pending[i] = s end
  return lib.run(function()
    while #pending > 0 do
      if lib.now() - t0 > timeout then return nil, #pending end
      local left = {}
      for _, s in ipairs(pending) do
        local c = core.net.connect { path = s, timeout = 500 }
        local ok = false
        if c then
          c:close()
          local res = lib.get({ path = s }, "/health", nil, 2000)
          ok = res and res.status == 200
        end
        if not ok then left[#left + 1] = s end
      end
      pending = left
      if #pending > 0 then core.sleep(20) end
    end
    return lib.now() - t0
  end)
end

local function idle_cpu(pids_fn, seconds)
  local pids = pids_fn()
  local c0 = lib.cpu_sum(pids)
  lib.sleep(seconds)
  return (lib.cpu_sum(pids) - c0) / seconds * 100
end

local function wait_no_marked(timeout)
  local deadline = lib.now() + (timeout or 30)
  while lib.now() < deadline do
    if #lib.marked() == 0 then return true end
    lib.sleep(0.2)
  end
  for _, pid in ipairs(lib.marked()) do core.proc.kill(pid, "SIGKILL") end
  lib.sleep(0.5)
  return false
end

local function pss_sum(pids)
  local t = 0
  for _, p in ipairs(pids) do t = t + (lib.pss_kb(p) or 0) end
  return t
end

local function ten_stopped(services)
  local dir = lib.tmpdir("density-stopped")
  local port = lib.free_port()
  local list = {}
  for i = 1, services do
    list[i] = { name = string.format("s%04d", i), lines = { string.format("command = %q", lib.backend),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"', 'health = "/health"' } }
  end
  local config = lib.ten_config { settings = { string.format("data_dir = %q", dir .. "/data"), "port = " .. port },
    services = list }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.sleep(2)
  local pids = lib.ten_pids(srv.pid)
  local rss, pss = lib.sum_kb(lib.rss_kb, pids), lib.sum_kb(lib.pss_kb, pids)
  lib.stop_ten(srv)
  return rss, pss
end

local function ten_running(idle_seconds)
  local dir = lib.tmpdir("density-ten")
  local port = lib.free_port()
  local ids, sockets = {}, {}
  for i = 1, N do
    ids[i] = string.format('"i%04d"', i)
    sockets[i] = string.format("%s/sock/app-i%04d.sock", dir, i)
  end
  local config = lib.ten_config {
    settings = { string.format("data_dir = %q", dir .. "/data"), "port = " .. port, "health_check_interval = 10" },
    services = { { name = "app", lines = { string.format("command = %q", lib.backend),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"', 'health = "/health"' } } },
    tail = { "[instances]", "app = [" .. table.concat(ids, ", ") .. "]" },
  }
  local used0 = lib.machine_used_kb()
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv, 60) end)
  local t0 = srv.started
  local answered, left = wait_all_answer(sockets, t0, 120)
  local running = lib.ten_wait_state(srv, "running", N, 60, 0.1)
  running = running and (lib.now() - t0)
  lib.sleep(5)
  local ten_pids = lib.ten_pids(srv.pid)
  local cpu = idle_cpu(function() return ten_pids end, idle_seconds)
  local row = {
    peer = "ten", version = lib.ten_version(), services = N, all_answer_s = answered and lib.round(answered, 2),
    ten_says_running_s = running and lib.round(running, 2),
    supervisor_rss_mb = lib.round(lib.sum_kb(lib.rss_kb, ten_pids) / 1024, 1),
    supervisor_pss_mb = lib.round(lib.sum_kb(lib.pss_kb, ten_pids) / 1024, 1),
    idle_cpu_pct = lib.round(cpu, 2), machine_used_mb = lib.round((lib.machine_used_kb() - used0) / 1024),
    not_answering = left,
    command = "ten serve (one service, " .. N .. " [instances], isolation process, health_check_interval = 10)",
  }
  local t_stop = lib.now()
  lib.stop_ten(srv, 60)
  row.stop_all_s = lib.round(lib.now() - t_stop, 2)
  wait_no_marked(30)
  return row, config
end

local function supervisord_running(idle_seconds)
  local dir = lib.tmpdir("density-supervisord")
  lib.must("mkdir -p " .. lib.q(dir .. "/sock") .. " " .. lib.q(dir .. "/childlogs"))
  local conf = { "[supervisord]", "nodaemon=true", "logfile=" .. dir .. "/supervisord.log",
    "pidfile=" .. dir .. "/supervisord.pid", "childlogdir=" .. dir .. "/childlogs", "minfds=10000", "minprocs=2000", "" }
  local sockets = {}
  for i = 1, N do
    local name = string.format("b%04d", i)
    sockets[i] = dir .. "/sock/" .. name .. ".sock"
    conf[#conf + 1] = "[program:" .. name .. "]"
    conf[#conf + 1] = "command=" .. lib.backend
    conf[#conf + 1] = string.format('environment=SOCKET_PATH="%s",INSTANCE_ID="%s",BENCH_MARK="%s"', sockets[i], name, lib.mark)
    conf[#conf + 1] = "autostart=true"
    conf[#conf + 1] = "autorestart=true"
    conf[#conf + 1] = ""
  end
  local path = lib.write(dir .. "/supervisord.conf", table.concat(conf, "\n"))
  local used0 = lib.machine_used_kb()
  local t0 = lib.now()
  local cmd = "supervisord -n -c " .. path
  local pid = lib.start(cmd, dir .. "/supervisord.out", "supervisord")
  lib.at_exit(function() lib.stop(pid, "SIGTERM", 60) end)
  local answered, left = wait_all_answer(sockets, t0, 120)
  lib.sleep(5)
  local cpu = idle_cpu(function() return { pid } end, idle_seconds)
  local row = {
    peer = "supervisord", version = lib.pkg_version("supervisor"), services = N,
    all_answer_s = answered and lib.round(answered, 2),
    supervisor_rss_mb = lib.round((lib.rss_kb(pid) or 0) / 1024, 1), supervisor_pss_mb = lib.round((lib.pss_kb(pid) or 0) / 1024, 1),
    idle_cpu_pct = lib.round(cpu, 2), machine_used_mb = lib.round((lib.machine_used_kb() - used0) / 1024),
    not_answering = left,
    command = cmd .. " (" .. N .. " [program:x] sections, autorestart=true, childlogdir set)",
  }
  local t_stop = lib.now()
  lib.stop(pid, "SIGTERM", 120)
  row.stop_all_s = lib.round(lib.now() - t_stop, 2)
  wait_no_marked(30)
  return row
end

local function s6_running(idle_seconds)
  local dir = lib.tmpdir("density-s6")
  local scan = dir .. "/scan"
  lib.must("mkdir -p " .. lib.q(dir .. "/sock") .. " " .. lib.q(scan))
  local sockets = {}
  for i = 1, N do
    local name = string.format("b%04d", i)
    sockets[i] = dir .. "/sock/" .. name .. ".sock"
    lib.must("mkdir -p " .. lib.q(scan .. "/" .. name))
    local run = scan .. "/" .. name .. "/run"
    lib.write(run, string.format("#!/bin/sh\nexport SOCKET_PATH=%s INSTANCE_ID=%s BENCH_MARK=%s\nexec %s\n",
      sockets[i], name, lib.mark, lib.backend))
    lib.must("chmod +x " .. lib.q(run))
  end
  local used0 = lib.machine_used_kb()
  local t0 = lib.now()
  -- without -c, s6-svscan supervises at most 500 services (PLATFORM.md)
  local cmd = string.format("env BENCH_MARK=%s s6-svscan -c %d %s", lib.mark, N + 1000, scan)
  local pid = lib.start(cmd, dir .. "/s6.out", "s6-svscan")
  lib.at_exit(function() lib.stop(pid, "SIGTERM", 30) end)
  local answered, left = wait_all_answer(sockets, t0, 120)
  lib.sleep(5)
  local function tree()
    local p = { pid }
    for _, c in ipairs(lib.descendants(pid)) do
      local comm = (lib.read("/proc/" .. c .. "/comm") or ""):gsub("%s+$", "")
      if comm == "s6-supervise" then p[#p + 1] = c end
    end
    return p
  end
  local pids = tree()
  local cpu = idle_cpu(tree, idle_seconds)
  local row = {
    peer = "s6-svscan", version = lib.pkg_version("s6"), services = N, all_answer_s = answered and lib.round(answered, 2),
    supervisor_rss_mb = lib.round(0 / 1024, 1), supervisor_pss_mb = lib.round(pss_sum(pids) / 1024, 1),
    idle_cpu_pct = lib.round(cpu, 2), machine_used_mb = lib.round((lib.machine_used_kb() - used0) / 1024),
    not_answering = left, supervisors = #pids,
    command = cmd .. " (" .. N .. " service dirs, run = #!/bin/sh exec backend)",
  }
  local rss = 0
  for _, p in ipairs(pids) do rss = rss + (lib.rss_kb(p) or 0) end
  row.supervisor_rss_mb = lib.round(rss / 1024, 1)
  local t_stop = lib.now()
  lib.stop(pid, "SIGTERM", 60)
  row.stop_all_s = lib.round(lib.now() - t_stop, 2)
  wait_no_marked(30)
  return row
end

function M.run()
  lib.ensure_packages { "supervisor", "s6" }
  local idle_seconds = tonumber(os.getenv("BENCH_IDLE_SECONDS")) or 30
  -- (a) configured and stopped
  local rss1, pss1 = ten_stopped(1)
  local rssN, pssN = ten_stopped(N)
  local per = (rssN - rss1) / (N - 1)
  lib.log("density stopped: 1 service %d kB, %d services %d kB (%.1f kB each)", rss1, N, rssN, per)
  local stopped_rows = {
    { peer = "ten", services = 1, rss_mb = lib.round(rss1 / 1024, 1), pss_mb = lib.round(pss1 / 1024, 1),
      command = "ten serve, 1 service, none running" },
    { peer = "ten", services = N, rss_mb = lib.round(rssN / 1024, 1), pss_mb = lib.round(pssN / 1024, 1),
      per_service_kb = lib.round(per, 1), command = "ten serve, " .. N .. " services, none running" },
  }
  -- (b) running
  wait_no_marked(5)
  local rows = {}
  local ten_row, config = ten_running(idle_seconds)
  rows[#rows + 1] = ten_row
  lib.log("density ten: all answer %.2f s, RSS %.1f MB, idle %.2f%%", ten_row.all_answer_s or -1,
    ten_row.supervisor_rss_mb, ten_row.idle_cpu_pct)
  local s6_row = s6_running(idle_seconds)
  rows[#rows + 1] = s6_row
  lib.log("density s6: all answer %.2f s, PSS %.1f MB, idle %.2f%%", s6_row.all_answer_s or -1,
    s6_row.supervisor_pss_mb, s6_row.idle_cpu_pct)
  local sv_row = supervisord_running(idle_seconds)
  rows[#rows + 1] = sv_row
  lib.log("density supervisord: all answer %.2f s, RSS %.1f MB, idle %.2f%%", sv_row.all_answer_s or -1,
    sv_row.supervisor_rss_mb, sv_row.idle_cpu_pct)

  local goals = {
    { goal = "1000 services configured and stopped: ten RSS <= 16 MB", value = string.format("%.1f MB (%.1f KB per service)",
      rssN / 1024, per), met = rssN <= 16 * 1024, detail = string.format("one service: %.1f MB", rss1 / 1024) },
    { goal = "1000 running instances: all healthy < 5 s", value = string.format("%s s (ten reports all running at %s s)",
      tostring(ten_row.all_answer_s), tostring(ten_row.ten_says_running_s)),
      met = ten_row.all_answer_s ~= nil and ten_row.all_answer_s < 5 and (ten_row.ten_says_running_s or 99) < 5,
      detail = string.format("s6 %s s, supervisord %s s", tostring(s6_row.all_answer_s), tostring(sv_row.all_answer_s)) },
    { goal = "1000 running instances: ten RSS < 30 MB", value = string.format("%.1f MB", ten_row.supervisor_rss_mb),
      met = ten_row.supervisor_rss_mb < 30,
      detail = string.format("s6 (svscan + 1000 s6-supervise) PSS %.1f MB, supervisord RSS %.1f MB",
        s6_row.supervisor_pss_mb, sv_row.supervisor_rss_mb) },
    { goal = "1000 running instances: idle CPU < 1% of a core (health checks every 10 s)",
      value = string.format("%.2f%%", ten_row.idle_cpu_pct), met = ten_row.idle_cpu_pct < 1,
      detail = string.format("s6 %.2f%%, supervisord %.2f%% (neither checks health)", s6_row.idle_cpu_pct, sv_row.idle_cpu_pct) },
  }
  return {
    title = M.title,
    tables = {
      { title = "(a) Configured and stopped", rows = stopped_rows,
        columns = { "peer", "services", "rss_mb", "pss_mb", "per_service_kb" } },
      { title = string.format("(b) %d running backend fixtures", N), rows = rows,
        columns = { "peer", "version", "all_answer_s", "ten_says_running_s", "supervisor_rss_mb", "supervisor_pss_mb",
          "idle_cpu_pct", "machine_used_mb", "stop_all_s" } },
    },
    goals = goals,
    notes = {
      "all_answer_s: from starting the supervisor to every one of the 1000 sockets answering GET /health with 200 "
        .. "(polled by this script the same way for every peer).",
      "supervisor_*: the supervisor's own processes (ten serve and its keeper; supervisord; s6-svscan plus its 1000 s6-supervise), "
        .. "not the 1000 backends; for s6 the RSS is a sum over 1001 processes, so shared pages count 1001 times: "
        .. "compare PSS. machine_used_mb: MemTotal - MemAvailable, minus the same before the start.",
      string.format("idle_cpu_pct: utime + stime of those processes over %d s, 5 s after all answered.", idle_seconds),
    },
    configs = { ["ten-1000.toml (head)"] = config:sub(1, 600) },
    versions = { ten = lib.ten_version(), supervisor = lib.pkg_version("supervisor"), s6 = lib.pkg_version("s6") },
  }
end

return M
