-- Logs: capture, indexing, search.
--   capture  4 instances under ten serve each write 1,000,000 lines of 100
--            bytes to stdout as fast as the pipe takes them (fixture flood),
--            then start the backend; the writers time themselves. Reference:
--            the same 4 writers into pipes drained by cat.
--   index    the same run: lines/s moved from the capture sink into the store
--            (SQLite FTS5) while lines are pending, and the drops counted by
--            tenement_log_lines_dropped_total; reference: the store's own
--            append_logs (lua/tenement/store.lua) fed directly, batches of 5000.
--   search   a store of 1,000,000 lines, searched through ten serve's API
--            (GET /api/logs?q= on the control socket).
local core = require "tenement.core"
local lib = require "lib"
local store_mod = require "tenement.store"

local M = { name = "logs", title = "Logs: capture, index, search" }

local WRITERS = 4
local LINES = tonumber(os.getenv("BENCH_LOG_LINES")) or 1000000
local SEARCH_LINES = tonumber(os.getenv("BENCH_SEARCH_LINES")) or 1000000

local function capture_reference(dir)
  local cmds = {}
  for i = 1, WRITERS do
    cmds[i] = string.format("( %s %d 100 | cat >/dev/null ) &", lib.q(lib.flood), LINES)
  end
  local t0 = lib.now()
  lib.must(table.concat(cmds, " ") .. " wait")
  local t = lib.now() - t0
  lib.write(dir .. "/ref.txt", tostring(t))
  return WRITERS * LINES / t, t
end

local function capture_and_index()
  local dir = lib.tmpdir("logs")
  local port = lib.free_port()
  lib.must("mkdir -p " .. lib.q(dir .. "/times"))
  local ids = {}
  for i = 1, WRITERS do ids[i] = string.format('"f%d"', i) end
  local command = string.format("t0=$(date +%%s%%N); %s %d 100; t1=$(date +%%s%%N); echo $t0 $t1 > %s/times/{id}; exec %s",
    lib.flood, LINES, dir, lib.backend)
  local config = lib.ten_config {
    settings = { string.format("data_dir = %q", dir .. "/data"), "port = " .. port, "health_check_interval = 3600",
      "log_max_lines = 5000000" },
    services = { { name = "flood", lines = { string.format("command = %q", command),
      string.format("socket = %q", dir .. "/sock/{name}-{id}.sock"), 'isolation = "process"', "startup_timeout = 300" } } },
    tail = { "[instances]", "flood = [" .. table.concat(ids, ", ") .. "]" },
  }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv) end)
  local db = dir .. "/data/tenement.db"
  local samples = {}
  local expected = WRITERS * LINES
  local captured, dropped, pending
  local deadline = lib.now() + 300
  local conn = assert(core.db.open(db, { readonly = true }))
  while lib.now() < deadline do
    local body = lib.metrics(srv)
    captured = lib.metric(body, "tenement_instance_log_lines_total") or 0
    dropped = lib.metric(body, "tenement_log_lines_dropped_total") or 0
    pending = lib.metric(body, "tenement_log_lines_pending") or 0
    local stored = lib.run(function()
      local rows = conn:query("SELECT coalesce(max(seq), 0) AS n FROM log_lines")
      return rows and rows[1].n or 0
    end)
    samples[#samples + 1] = { t = lib.now(), stored = stored, pending = pending }
    local done = 0
    for i = 1, WRITERS do if lib.read(dir .. "/times/f" .. i) then done = done + 1 end end
    -- every writer finished, every line counted, nothing pending any more
    if done == WRITERS and captured >= expected and pending == 0 then break end
    lib.sleep(0.25)
  end
  -- a batch taken from the sink may still be on its way into the store
  lib.sleep(1)
  samples[#samples].stored = lib.run(function()
    local rows = conn:query("SELECT coalesce(max(seq), 0) AS n FROM log_lines")
    return rows and rows[1].n or 0
  end)
  conn:close()
  -- the writers' own times
  local first, last = math.huge, 0
  for i = 1, WRITERS do
    local t0, t1 = (lib.read(dir .. "/times/f" .. i) or ""):match("(%d+) (%d+)")
    first = math.min(first, tonumber(t0) / 1e9)
    last = math.max(last, tonumber(t1) / 1e9)
  end
  local writer_s = last - first
  -- indexing rate: while lines were pending, stored lines per second
  local i0, i1
  for i, s in ipairs(samples) do
    if s.stored > 0 and not i0 then i0 = i end
    if s.stored > 0 and s.pending > 0 then i1 = i + 1 end
  end
  i1 = math.min(i1 or #samples, #samples)
  local index_rate
  if i0 and i1 > i0 then
    index_rate = (samples[i1].stored - samples[i0].stored) / (samples[i1].t - samples[i0].t)
  end
  local stored = samples[#samples].stored
  local log = lib.read(srv.log) or ""
  lib.stop_ten(srv)
  return {
    writer_s = writer_s, capture_rate = expected / writer_s, captured = captured, dropped = dropped,
    stored = stored, index_rate = index_rate, config = config, serve_log_errors = select(2, log:gsub(" error ", "")),
  }
end

local WORDS = {}
do
  local syll = { "ka", "lo", "mi", "re", "su", "ta", "ne", "po", "vi", "xu", "de", "gra", "sto", "pli", "mun", "zor" }
  math.randomseed(7)
  local rnd = math.random
  for i = 1, 2000 do
    WORDS[i] = syll[rnd(#syll)] .. syll[rnd(#syll)] .. syll[rnd(#syll)] .. (i % 10)
  end
end

-- A store of n lines, written with the store's own code. -> path, lines/s
local function build_store(dir, n)
  local path = dir .. "/data/tenement.db"
  lib.must("mkdir -p " .. lib.q(dir .. "/data"))
  local rate
  lib.run(function()
    local st = assert(store_mod.open(path))
    local batch, written = {}, 0
    math.randomseed(42)
    local rnd = math.random
    local now = core.time()
    local t0 = lib.now()
    for i = 1, n do
      local inst = string.format("app:i%03d", rnd(100))
      -- a Zipf-ish choice of words: some common, most rare
      local w1, w2, w3 = WORDS[rnd(20)], WORDS[rnd(2000)], WORDS[rnd(rnd(2000))]
      batch[#batch + 1] = { now - (n - i) / 1000, inst, i % 10 == 0 and "stderr" or "stdout",
        string.format("%s GET /api/%s/%d status=%d took=%dms %s req-%08x", w1, w2, rnd(100000),
          ({ 200, 200, 200, 404, 500 })[rnd(5)], rnd(900), w3, i) }
      if #batch == 5000 then
        assert(st:append_logs(batch))
        written = written + #batch
        batch = {}
      end
    end
    if #batch > 0 then assert(st:append_logs(batch)) end
    rate = n / (lib.now() - t0)
    st:close()
  end)
  return path, rate
end

local function search_latency(dir, queries)
  local port = lib.free_port()
  local config = lib.ten_config {
    settings = { string.format("data_dir = %q", dir .. "/data"), "port = " .. port, "log_max_lines = 5000000" },
    services = { { name = "app", lines = { string.format("command = %q", lib.backend), 'isolation = "process"' } } },
  }
  local srv = lib.start_ten { dir = dir, config = config, port = port }
  lib.at_exit(function() lib.stop_ten(srv) end)
  local rows = {}
  for _, q in ipairs(queries) do
    local times, hits = {}, 0
    for _ = 1, 20 do
      local t0 = lib.now()
      local res, status = lib.ten_api(srv, "GET", "/api/logs?limit=100&" .. q.query)
      times[#times + 1] = (lib.now() - t0) * 1000
      assert(status == 200, "GET /api/logs?" .. q.query .. ": " .. tostring(status))
      hits = #res
    end
    rows[#rows + 1] = { search = q.what, query = q.query, returned = hits, p50_ms = lib.round(lib.percentile(times, 50), 1),
      p99_ms = lib.round(lib.percentile(times, 99), 1), peer = "ten",
      command = "GET /api/logs?limit=100&" .. q.query .. " on the control socket, 20 times" }
    lib.log("search %-28s p50 %.1f ms p99 %.1f ms (%d rows)", q.what, rows[#rows].p50_ms, rows[#rows].p99_ms, hits)
  end
  lib.stop_ten(srv)
  return rows
end

function M.run()
  local ref_rate, ref_s = capture_reference(lib.tmpdir("logs-ref"))
  lib.log("capture reference: %d writers into cat: %.0f lines/s (%.2f s)", WRITERS, ref_rate, ref_s)
  local r = capture_and_index()
  lib.log("capture: %.0f lines/s (%.2f s), captured %d, dropped %d, stored %d, indexed %.0f lines/s",
    r.capture_rate, r.writer_s, r.captured, r.dropped, r.stored, r.index_rate or -1)

  local sdir = lib.tmpdir("logs-search")
  local _, raw_rate = build_store(sdir, SEARCH_LINES)
  -- the store's pages reach the disk before searches are timed: the
  -- kernel's writeback of a build that just ended would otherwise overlap
  -- them, the more so the faster the build
  lib.must("sync")
  lib.log("store append_logs directly: %.0f lines/s", raw_rate)
  local rare = WORDS[1999]
  local queries = {
    { what = "common word (in ~5% of lines)", query = "q=" .. WORDS[3] },
    { what = "rare word", query = "q=" .. rare },
    { what = "two words (AND)", query = "q=" .. WORDS[3] .. "+" .. WORDS[7] },
    { what = "prefix", query = "q=" .. WORDS[5]:sub(1, 4) },
    { what = "word + instance filter", query = "q=" .. WORDS[3] .. "&instance=app:i042" },
    { what = "no match", query = "q=zzzznothing" },
    { what = "latest lines, no query", query = "instance=app:i042" },
  }
  local search_rows = search_latency(sdir, queries)

  local capture_rows = {
    { what = "4 writers into ten serve (ring buffers + sink)", lines = WRITERS * LINES,
      lines_per_s = lib.round(r.capture_rate), writer_s = lib.round(r.writer_s, 2), captured = lib.round(r.captured),
      dropped = lib.round(r.dropped), stored = r.stored, peer = "ten",
      command = string.format("ten serve, [instances] flood = 4, command: flood %d 100 (timed by the instance) then the backend", LINES) },
    { what = "reference: 4 writers into cat >/dev/null", lines = WRITERS * LINES, lines_per_s = lib.round(ref_rate),
      writer_s = lib.round(ref_s, 2), peer = "cat", command = string.format("4 x (flood %d 100 | cat >/dev/null)", LINES) },
  }
  local index_rows = {
    { what = "ten serve: sink to store while lines were pending", lines_per_s = lib.round(r.index_rate or 0), peer = "ten",
      command = "the same run; max(seq) of log_lines sampled every 250 ms" },
    { what = "reference: store.lua append_logs directly (batches of 5000)", lines_per_s = lib.round(raw_rate),
      peer = "sqlite " .. lib.pkg_version("libsqlite3-0"),
      command = string.format("lua: store.open + append_logs, %d lines of about 80 bytes", SEARCH_LINES) },
  }
  local worst = 0
  for _, s in ipairs(search_rows) do worst = math.max(worst, s.p99_ms) end
  local goals = {
    { goal = "capture >= 200k lines/s into the ring buffers without blocking any writer",
      value = string.format("%.0f lines/s", r.capture_rate), met = r.capture_rate >= 200000 and r.captured >= WRITERS * LINES,
      detail = string.format("writers into cat: %.0f lines/s; ten counted %d of %d lines", ref_rate, r.captured, WRITERS * LINES) },
    { goal = "index >= 40k lines/s into FTS5; drops counted, never silent",
      value = string.format("%.0f lines/s; %d dropped and counted", r.index_rate or 0, r.dropped),
      met = (r.index_rate or 0) >= 40000 and (r.stored + r.dropped >= WRITERS * LINES),
      detail = string.format("store.lua directly: %.0f lines/s; stored %d + dropped %d = %d of %d", raw_rate, r.stored,
        r.dropped, r.stored + r.dropped, WRITERS * LINES) },
    { goal = "search over a million lines (published)", value = string.format("worst p99 %.1f ms", worst), met = nil },
  }
  return {
    title = M.title,
    tables = {
      { title = "Capture", rows = capture_rows,
        columns = { "what", "lines", "lines_per_s", "writer_s", "captured", "dropped", "stored" } },
      { title = "Indexing into SQLite FTS5", rows = index_rows, columns = { "what", "lines_per_s" } },
      { title = string.format("Search over %d lines (20 queries each)", SEARCH_LINES), rows = search_rows,
        columns = { "search", "query", "returned", "p50_ms", "p99_ms" } },
    },
    goals = goals,
    notes = {
      "capture lines_per_s: lines written / the writers' own wall time (first start to last end); a writer blocked "
        .. "by a slow reader would show here, as it does not with cat.",
      "The capture sink holds at most 100000 lines waiting for the store; lines beyond that are dropped and counted "
        .. "(tenement_log_lines_dropped_total).",
    },
    configs = { ["logs.toml"] = r.config },
    versions = { ten = lib.ten_version(), sqlite = lib.pkg_version("libsqlite3-0") },
  }
end

M._build_store, M._search = build_store, search_latency
M._words = WORDS
return M
