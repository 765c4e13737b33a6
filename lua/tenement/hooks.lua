-- User hooks ([hooks] in tenement.toml): Lua files loaded into a box of
-- their own. A hook may read what it is given and compute; it gets no io,
-- os, require or debug, runs under an instruction budget, and any error it
-- raises is contained: the caller logs it and falls back to the default.
local core = require "tenement.core"
local log = require "tenement.log"

local hooks = {}

hooks.BUDGET = 1000000 -- instructions per call

-- The budget's error, told apart from any other: a hook's own pcall must
-- not catch it, or a hook looping around a pcall ran for good.
local EXCEEDED = setmetatable({}, { __tostring = function()
  return "hook exceeded its budget of " .. hooks.BUDGET .. " instructions"
end })

local function rethrow_budget(ok, ...)
  if not ok and ... == EXCEEDED then error(EXCEEDED, 0) end
  return ok, ...
end

-- Copies: the server's own libraries are shared by all its code, and a hook
-- that changed one (string.format = nil) broke the server, not only itself.
local function copy(lib)
  local t = {}
  for k, v in pairs(lib) do t[k] = v end
  return t
end

-- Memory: one instruction (a concatenation, a string.rep) can ask for
-- gigabytes, out of reach of the instruction budget. While a hook runs, the
-- state's allocator refuses growth past this (core.memory_cap), which the
-- hook meets as a memory error of its own.
hooks.MAX_MEMORY = 64 * 1024 * 1024

-- A hook's answer is copied as plain data; deeper nests are refused there
-- (a copy that recursed without end overflowed the server's stack).
hooks.MAX_DEPTH = 64

hooks.MAX_PRINT = 16 * 1024

local WITHHELD = { io = true, os = true, require = true, debug = true, package = true, load = true,
  loadfile = true, dofile = true, collectgarbage = true, coroutine = true }

local function sandbox(name)
  local env = {
    string = copy(string), table = copy(table), math = copy(math), utf8 = copy(utf8),
    pairs = pairs, ipairs = ipairs, next = next, select = select, type = type,
    tostring = tostring, tonumber = tonumber, error = error, assert = assert,
    pcall = function(...) return rethrow_budget(pcall(...)) end,
    -- a finalizer would run when the server's collector gets to it, in
    -- whatever the server was doing, with no budget
    setmetatable = function(t, mt)
      if type(mt) == "table" and rawget(mt, "__gc") ~= nil then error("a hook may not set __gc", 2) end
      return setmetatable(t, mt)
    end,
    -- a string's metatable leads to the server's string library
    getmetatable = function(v) if type(v) == "table" then return getmetatable(v) end end,
    rawget = rawget, rawset = rawset, rawequal = rawequal, rawlen = rawlen,
    -- a line of the server's log, cut as an instance's lines are
    print = function(...)
      local parts = {}
      for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
      local line = table.concat(parts, " ")
      if #line > hooks.MAX_PRINT then line = line:sub(1, hooks.MAX_PRINT) .. " [cut: " .. #line .. " bytes]" end
      log.info("[hook %s] %s", name, log.printable(line))
    end,
  }
  env._G = env
  -- what a hook reaches for and may not have: said by name, not as "attempt
  -- to call a nil value (global 'require')"
  return setmetatable(env, { __index = function(_, key)
    if WITHHELD[key] then
      error(string.format("%s is not available in a hook: a hook computes from what it is given, with string, "
        .. "table, math, utf8, print and pcall", key), 2)
    end
  end })
end

-- hooks.load(path, name) -> table of functions | nil, err
-- The file returns a table of functions (route = function ... end), or a
-- single function, taken as the hook named `name`.
function hooks.load(path, name)
  local f, err = io.open(path, "rb")
  local text, rerr = nil, nil
  if f then
    text, rerr = f:read("a") -- a directory opens, and fails here
    f:close()
  end
  -- io.open's error names the path already
  if not text then return nil, string.format("[hooks] %s: cannot read %s", name, err or (path .. ": " .. rerr)) end
  -- as lua itself takes a file: a UTF-8 BOM, and a first line of "#!..."
  -- (kept as an empty line, so the line numbers stay)
  text = text:gsub("^\239\187\191", ""):gsub("^#[^\n]*", "")
  local chunk, cerr = load(text, "@" .. path, "t", sandbox(name))
  if not chunk then return nil, string.format("[hooks] %s: the file does not compile: %s", name, cerr) end
  local ok, result = hooks.call(chunk)
  if not ok then return nil, string.format("[hooks] %s: loading %s failed: %s", name, path, result) end
  if type(result) == "function" then result = { [name] = result } end
  if type(result) ~= "table" or type(result[name]) ~= "function" then
    local got = type(result) ~= "table" and ("it returned " .. (result == nil and "nothing" or "a " .. type(result)))
      or ("it returned a table with " .. (result[name] == nil and ("no " .. name) or (name .. " a " .. type(result[name]))))
    return nil, string.format("[hooks] %s: %s must return a function, or a table with a function %q; %s",
      name, path, name, got)
  end
  return result
end

-- A value as plain data: tables copied without their metatables. What a
-- hook answers, so that reading it runs none of the hook's code (an __index
-- or __tostring would run in the server, with no budget); and what it is
-- given of the server's state, so that what it changes stays its own.
local function plain(v, seen, depth)
  if type(v) ~= "table" then return v end
  seen, depth = seen or {}, (depth or 0) + 1
  if seen[v] then return seen[v] end
  if depth > hooks.MAX_DEPTH then error(string.format("tables nested more than %d deep", hooks.MAX_DEPTH), 0) end
  local t = {}
  seen[v] = t
  local k, x = next(v)
  while k ~= nil do
    rawset(t, plain(k, seen, depth), plain(x, seen, depth))
    k, x = next(v, k)
  end
  return t
end

hooks.plain = plain

local function plain_results(result)
  if not result[1] then
    local err = result[2]
    if type(err) ~= "string" and type(err) ~= "number" then err = "an error value of type " .. type(err) end
    return false, err
  end
  local out = { n = result.n }
  local ok, err = pcall(function() for i = 1, result.n do out[i] = plain(result[i]) end end)
  if not ok then return false, "its answer has " .. tostring(err) end
  return table.unpack(out, 1, out.n)
end

-- hooks.call(fn, ...) -> true, results... | false, err. The budget stops a
-- hook that loops forever; the error never escapes, and no code of the hook
-- runs once the call is over (its answer is plain data).
function hooks.call(fn, ...)
  local count, at = 0, nil
  local thread = coroutine.running()
  local previous = { debug.gethook(thread) }
  debug.sethook(thread, function()
    count = count + 1000
    if count > hooks.BUDGET then
      -- where the hook was when its budget ran out: the loop to look at
      local info = debug.getinfo(2, "Sl")
      at = info and info.currentline and info.currentline > 0 and (info.short_src .. ":" .. info.currentline)
      error(EXCEEDED, 0)
    end
  end, "", 1000)
  core.memory_cap(hooks.MAX_MEMORY)
  local result = table.pack(pcall(fn, ...))
  local refused = core.memory_cap()
  debug.sethook(thread, table.unpack(previous))
  if not result[1] and result[2] == EXCEEDED then
    return false, tostring(EXCEEDED) .. (at and (" (at " .. at .. ")") or "")
  end
  if not result[1] and refused then
    return false, string.format("hook asked for more than its %d MiB of memory (%s)", hooks.MAX_MEMORY >> 20,
      tostring(result[2]))
  end
  return plain_results(result)
end

return hooks
