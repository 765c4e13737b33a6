-- User hooks ([hooks] in tenement.toml): Lua files loaded into a box of
-- their own. A hook may read what it is given and compute; it gets no io,
-- os, require or debug, runs under an instruction budget, and any error it
-- raises is contained: the caller logs it and falls back to the default.
local log = require "tenement.log"

local hooks = {}

hooks.BUDGET = 1000000 -- instructions per call

-- Set once the running call went past its budget. The error that stops it
-- is raised inside the hook, where its own pcall could catch it and loop
-- on: the box's pcall raises it again instead.
local over_budget = false

local function boxed_pcall(f, ...)
  local result = table.pack(pcall(f, ...))
  if over_budget then error("hook exceeded its budget of " .. hooks.BUDGET .. " instructions", 0) end
  return table.unpack(result, 1, result.n)
end

-- A library as a table of the hook's own: the server routes with the real
-- ones (host:lower(), math.random for weighted choices), and a hook that
-- replaced one of their functions would change that for every request.
local function own(lib)
  local t = {}
  for k, v in pairs(lib) do t[k] = v end
  return t
end

local function sandbox(name)
  local env = {
    string = own(string), table = own(table), math = own(math), utf8 = own(utf8),
    pairs = pairs, ipairs = ipairs, next = next, select = select, type = type,
    tostring = tostring, tonumber = tonumber, error = error, assert = assert,
    pcall = boxed_pcall, setmetatable = setmetatable,
    -- strings share one metatable, whose __index is the real string library
    getmetatable = function(v) if type(v) ~= "string" then return getmetatable(v) end end,
    rawget = rawget, rawset = rawset, rawequal = rawequal, rawlen = rawlen,
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      log.info("[hook %s] %s", name, table.concat(parts, " "))
    end,
  }
  env._G = env
  return env
end

-- hooks.load(path, name) -> table of functions | nil, err
-- The file returns a table of functions (route = function ... end), or a
-- single function, taken as the hook named `name`.
function hooks.load(path, name)
  local f, err = io.open(path, "rb")
  if not f then return nil, string.format("[hooks] %s: cannot read %s", name, err) end
  local text = f:read("a")
  f:close()
  local chunk, cerr = load(text, "@" .. path, "t", sandbox(name))
  if not chunk then return nil, string.format("[hooks] %s: %s", name, cerr) end
  local ok, result = hooks.call(chunk)
  if not ok then return nil, string.format("[hooks] %s: loading %s failed: %s", name, path, result) end
  if type(result) == "function" then result = { [name] = result } end
  if type(result) ~= "table" or type(result[name]) ~= "function" then
    return nil, string.format("[hooks] %s: %s must return a function, or a table with a function %q",
      name, path, name)
  end
  return result
end

-- hooks.call(fn, ...) -> true, results... | false, err. The budget stops a
-- hook that loops forever; the error never escapes.
function hooks.call(fn, ...)
  local count = 0
  local thread = coroutine.running()
  local previous = { debug.gethook(thread) }
  over_budget = false
  debug.sethook(thread, function()
    count = count + 1000
    if count > hooks.BUDGET then
      over_budget = true
      error("hook exceeded its budget of " .. hooks.BUDGET .. " instructions", 2)
    end
  end, "", 1000)
  local result = table.pack(pcall(fn, ...))
  debug.sethook(thread, table.unpack(previous))
  over_budget = false
  return table.unpack(result, 1, result.n)
end

return hooks
