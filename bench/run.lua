-- make bench [BENCH="proxy spawn ..."]: runs the benchmarks, then merges their
-- results into bench/results/latest.json, renders latest.md and the summary
-- in README.md. A benchmark run alone replaces only its own section.
--
--   lua5.4 bench/run.lua [proxy|spawn|density|logs|scale ...]
--   lua5.4 bench/run.lua --report     (only re-render latest.md and README)
local lib = require "lib"
local report = require "report"

local ALL = { "proxy", "spawn", "density", "logs", "scale" }

local function selected(args)
  local names = {}
  for _, a in ipairs(args) do
    for w in a:gmatch("[%w_]+") do names[#names + 1] = w end
  end
  if #names == 0 then
    for w in (os.getenv("BENCH") or ""):gmatch("[%w_]+") do names[#names + 1] = w end
  end
  if #names == 0 then return ALL end
  return names
end

local function main(args)
  if args[1] == "--report" then
    report.render()
    return 0
  end
  if io.popen("id -u"):read("l") ~= "0" then
    io.stderr:write("make bench needs root (it installs its peers with apt-get and creates namespaces)\n")
    return 1
  end
  local names = selected(args)
  local sections, failed = {}, 0
  local t_all = lib.now()
  for _, name in ipairs(names) do
    local ok_mod, mod = pcall(require, name)
    if not ok_mod then error("no benchmark " .. name .. ": " .. tostring(mod)) end
    lib.log("== %s", mod.title or name)
    local t0 = lib.now()
    local load_before = lib.loadavg()
    local ok, res = xpcall(mod.run, debug.traceback, {})
    lib.cleanup()
    if ok then
      res.seconds = lib.round(lib.now() - t0, 1)
      res.load = { before = load_before, after = lib.loadavg() }
      sections[name] = res
    else
      failed = failed + 1
      lib.log("%s FAILED: %s", name, res)
      sections[name] = { title = mod.title or name, error = tostring(res), seconds = lib.round(lib.now() - t0, 1) }
    end
    lib.log("== %s done in %.0f s", name, lib.now() - t0)
  end
  report.merge(sections)
  report.render()
  lib.log("all done in %.0f s; results in bench/results/latest.md", lib.now() - t_all)
  return failed == 0 and 0 or 1
end

local ok, code = xpcall(main, debug.traceback, arg)
lib.cleanup()
if not ok then
  io.stderr:write(tostring(code), "\n")
  os.exit(1)
end
os.exit(code)
