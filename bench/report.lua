-- Results: bench/results/latest.json (every section, merged across runs),
-- bench/results/latest.md (rendered from it) and the summary table under
-- "## Benchmarks" in README.md.
local lib = require "lib"
local cjson = require "cjson"

local report = {}

local RESULTS = "bench/results"
local JSON = RESULTS .. "/latest.json"
local MD = RESULTS .. "/latest.md"
local README = "README.md"
local ORDER = { "proxy", "spawn", "density", "logs", "scale", "stress" }

-- Pretty JSON with sorted keys, so a rerun diffs line by line.
local function encode(v, indent)
  indent = indent or ""
  local t = type(v)
  if t == "table" then
    local n = #v
    local is_array = n > 0 or next(v) == nil
    if is_array and n == 0 then return next(v) == nil and "[]" or "{}" end
    local inner = indent .. "  "
    local parts = {}
    if is_array and n > 0 then
      for i = 1, n do parts[i] = inner .. encode(v[i], inner) end
      return "[\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local val = v[k]
      if val == nil then val = v[tonumber(k)] end
      parts[#parts + 1] = inner .. cjson.encode(k) .. ": " .. encode(val, inner)
    end
    return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return "null" end
    if math.type(v) == "integer" then return tostring(v) end
    return string.format("%.6g", v)
  elseif t == "nil" then
    return "null"
  end
  return cjson.encode(v)
end
report.encode = encode

function report.load()
  local text = lib.read(JSON)
  if not text then return { sections = {} } end
  local ok, data = pcall(cjson.decode, text)
  if not ok or type(data) ~= "table" then return { sections = {} } end
  data.sections = data.sections or {}
  return data
end

-- No path or port of this machine goes into the results: the repository
-- becomes ".", a run's temp dirs "$DIR", loopback ports "$PORT".
local function sanitize(v)
  if type(v) == "string" then
    local root = lib.root:gsub("%p", "%%%0")
    local tmp = (os.getenv("TMPDIR") or "/tmp"):gsub("%p", "%%%0")
    v = v:gsub(root .. "/", ""):gsub(root, ".")
    v = v:gsub(tmp .. "/tenbench%-[%w%-]+%.[%w]+", "$DIR"):gsub(tmp .. "/tenement%-[%w%-]+%.[%w]+", "$DIR")
    v = v:gsub("127%.0%.0%.1:%d+", "127.0.0.1:$PORT"):gsub("port = %d+", "port = $PORT")
    return v
  elseif type(v) == "table" then
    local out = {}
    for k, x in pairs(v) do out[k] = sanitize(x) end
    return out
  end
  return v
end
report.sanitize = sanitize

function report.merge(sections)
  local data = report.load()
  local date = os.date("!%Y-%m-%d %H:%M UTC")
  data.machine = lib.machine()
  data.date = date
  for name, s in pairs(sections) do
    s = sanitize(s)
    s.date = date
    data.sections[name] = s
  end
  os.execute("mkdir -p " .. RESULTS)
  lib.write(JSON, encode(data) .. "\n")
  return data
end

local function cell(v)
  if v == nil or v == cjson.null then return "" end
  if type(v) == "boolean" then return v and "yes" or "no" end
  if type(v) == "number" then
    if math.type(v) == "integer" or v == math.floor(v) and math.abs(v) < 1e15 then
      return tostring(math.tointeger(v) or v)
    end
    if math.abs(v) >= 100 then return string.format("%.0f", v) end
    if math.abs(v) >= 10 then return string.format("%.1f", v) end
    return string.format("%.3g", v)
  end
  return (tostring(v):gsub("|", "\\|"):gsub("\n", " "))
end

local function table_md(columns, rows)
  local out = { "| " .. table.concat(columns, " | ") .. " |", "|" .. string.rep("---|", #columns) }
  for _, r in ipairs(rows) do
    local cells = {}
    for i, c in ipairs(columns) do cells[i] = cell(r[c]) end
    out[#out + 1] = "| " .. table.concat(cells, " | ") .. " |"
  end
  return table.concat(out, "\n")
end

local function met_text(m)
  if m == true then return "met" end
  if m == false then return "NOT met" end
  return "measured"
end

local function machine_line(m)
  if not m then return "" end
  return string.format("%s, %d cores (%s), %d MB RAM, Linux %s", m.os or "?", m.cpus or 0, m.cpu_model or "?",
    m.mem_mb or 0, m.kernel or "?")
end

function report.render()
  local data = report.load()
  local md = { "# Benchmark results", "",
    "Written by `make bench` and `make stress` (bench/run.lua, bench/stress.lua); every number below was "
      .. "measured on the machine named here, against peers started in the same run.", "",
    "Machine: " .. machine_line(data.machine), "" }
  local names = {}
  for _, n in ipairs(ORDER) do if data.sections[n] then names[#names + 1] = n end end
  for n in pairs(data.sections) do
    local known = false
    for _, o in ipairs(ORDER) do if o == n then known = true end end
    if not known then names[#names + 1] = n end
  end
  for _, name in ipairs(names) do
    local s = data.sections[name]
    md[#md + 1] = "## " .. (s.title or name)
    md[#md + 1] = ""
    md[#md + 1] = string.format("Run %s, %s s, load average %s before and %s after. Rerun alone: `make %s%s`.",
      s.date or "?", tostring(s.seconds or "?"), s.load and s.load.before or "?", s.load and s.load.after or "?",
      name == "stress" and "stress" or "bench", name == "stress" and "" or (" BENCH=" .. name))
    md[#md + 1] = ""
    if s.error then
      md[#md + 1] = "**This benchmark failed:**"
      md[#md + 1] = ""
      md[#md + 1] = "```"
      md[#md + 1] = tostring(s.error)
      md[#md + 1] = "```"
      md[#md + 1] = ""
    end
    if s.goals and #s.goals > 0 then
      local rows = {}
      for _, g in ipairs(s.goals) do
        rows[#rows + 1] = { goal = g.goal, measured = g.value, result = met_text(g.met), detail = g.detail }
      end
      md[#md + 1] = table_md({ "goal", "measured", "result", "detail" }, rows)
      md[#md + 1] = ""
    end
    for _, t in ipairs(s.tables or { { columns = s.columns, rows = s.rows } }) do
      if t.columns and t.rows and #t.rows > 0 then
        if t.title then md[#md + 1] = "### " .. t.title md[#md + 1] = "" end
        md[#md + 1] = table_md(t.columns, t.rows)
        md[#md + 1] = ""
      end
    end
    if s.notes and #s.notes > 0 then
      for _, n in ipairs(s.notes) do md[#md + 1] = "- " .. n end
      md[#md + 1] = ""
    end
    if s.versions then
      local v = {}
      for k, val in pairs(s.versions) do v[#v + 1] = k .. " " .. tostring(val) end
      table.sort(v)
      md[#md + 1] = "Versions: " .. table.concat(v, "; ") .. "."
      md[#md + 1] = ""
    end
    -- the exact commands, each once
    local seen, cmds = {}, {}
    local function add(c) if c and not seen[c] then seen[c] = true cmds[#cmds + 1] = c end end
    for _, t in ipairs(s.tables or { { rows = s.rows } }) do
      for _, r in ipairs(t.rows or {}) do add(r.command) add(r.wrk) end
    end
    for _, c in ipairs(s.commands or {}) do add(c) end
    if #cmds > 0 then
      md[#md + 1] = "Commands:"
      md[#md + 1] = ""
      for _, c in ipairs(cmds) do md[#md + 1] = "- `" .. c .. "`" end
      md[#md + 1] = ""
    end
  end
  lib.write(MD, table.concat(md, "\n"))
  report.readme(data, names)
end

-- The "## Benchmarks" section of README.md: one row per goal.
function report.readme(data, names)
  local text = lib.read(README)
  if not text then return end
  local rows = {}
  for _, name in ipairs(names) do
    local s = data.sections[name]
    if s.error then
      rows[#rows + 1] = { benchmark = s.title or name, goal = "(the run failed; see bench/results/latest.md)",
        measured = "", result = "" }
    end
    for _, g in ipairs(s.summary or s.goals or {}) do
      rows[#rows + 1] = { benchmark = name, goal = g.goal, measured = g.value, result = met_text(g.met) }
    end
  end
  local dates = {}
  for _, name in ipairs(names) do
    local d = data.sections[name].date
    if d then dates[d:sub(1, 10)] = true end
  end
  local dl = {}
  for d in pairs(dates) do dl[#dl + 1] = d end
  table.sort(dl)
  local section = table.concat({
    "## Benchmarks",
    "",
    string.format("Measured %s on %s, against nginx, HAProxy, supervisord and s6 started in the same run "
      .. "(`make bench`, `make stress`; every row, peer version and command in "
      .. "[bench/results/latest.md](bench/results/latest.md)).", table.concat(dl, ", "), machine_line(data.machine)),
    "",
    table_md({ "benchmark", "goal", "measured", "result" }, rows),
    "",
  }, "\n")
  local s, e = text:find("\n## Benchmarks\n.-\n## ")
  if s then
    text = text:sub(1, s) .. section .. "\n" .. text:sub(e - 2)
  elseif text:find("\n## Benchmarks\n") then
    local at = text:find("\n## Benchmarks\n")
    text = text:sub(1, at) .. section
  else
    local at = text:find("\n## License\n")
    if at then text = text:sub(1, at) .. section .. "\n" .. text:sub(at + 1)
    else text = text .. "\n" .. section end
  end
  lib.write(README, text)
end

return report
