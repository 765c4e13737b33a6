-- The server's own log: one line per event on stderr, with time and level.
-- (Instances' output is captured separately, by core.logbuf.)
local log = {}

local levels = { debug = 1, info = 2, warn = 3, error = 4 }
local threshold = levels[os.getenv("TENEMENT_LOG_LEVEL") or "info"] or levels.info
local sink = io.stderr

-- Text from outside (an app's output, a token's description, a hook's
-- print) goes to the operator's terminal with its control characters shown
-- by their codes: escape sequences would drive the terminal. That is C0 but
-- the tab, DEL, and C1 as UTF-8 writes it (U+009B is a CSI to terminals
-- that read C1).
function log.printable(s)
  return (s:gsub("[\0-\8\10-\31\127]", function(ch) return string.format("\\x%02x", ch:byte()) end)
    :gsub("\194([\128-\159])", function(ch) return string.format("\\u%04x", ch:byte()) end))
end

-- log.printable, but colours kept: an app's SGR sequences (ESC [ digits and
-- ; m), which only colour text, go through, and the line ends with a reset
-- so none bleeds into the next. For a terminal that shows them.
function log.printable_coloured(s)
  local out, from, kept = {}, 1, false
  for at, params, after in s:gmatch("()\27%[([%d;]*)m()") do
    out[#out + 1] = log.printable(s:sub(from, at - 1))
    if #params <= 32 then
      out[#out + 1] = "\27[" .. params .. "m"
      kept = true
    else
      out[#out + 1] = log.printable(s:sub(at, after - 1))
    end
    from = after
  end
  out[#out + 1] = log.printable(s:sub(from))
  if kept then out[#out + 1] = "\27[0m" end
  return table.concat(out)
end

function log.set_level(name)
  threshold = assert(levels[name], "unknown log level " .. tostring(name))
end

-- For specs: where the lines go (anything with :write).
function log.set_sink(s) sink = s or io.stderr end

local function emit(level, fmt, ...)
  if levels[level] < threshold then return end
  local ok, msg = pcall(string.format, fmt, ...)
  if not ok then msg = fmt end
  -- one event, one line, whatever a message quotes (a failed start's last
  -- output): grep and journald read the log a line at a time
  if msg:find("[\r\n]") then msg = msg:gsub("\r?\n%s*", " | "):gsub("\r", " ") end
  sink:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " ", level, " ", msg, "\n")
  if sink.flush then sink:flush() end
end

function log.debug(fmt, ...) emit("debug", fmt, ...) end
function log.info(fmt, ...) emit("info", fmt, ...) end
function log.warn(fmt, ...) emit("warn", fmt, ...) end
function log.error(fmt, ...) emit("error", fmt, ...) end

-- log.limited(level, per_second, what) -> function(msg), flush(): logs at
-- most per_second of the messages given it in each second; the rest are
-- counted and told in one line when that second is over, or by flush() (a
-- server stopping before the second is over would lose the count). For
-- errors a client can cause as fast as it sends requests (a dead upstream
-- answering 502s): the first ones say what happened, and the log cannot be
-- flooded.
function log.limited(level, per_second, what)
  local core = require "tenement.core"
  local second, logged, dropped = nil, 0, 0
  local function flush()
    if dropped > 0 then
      emit(level, "%d more %s in that second not logged (at most %d a second)", dropped, what, per_second)
    end
    dropped = 0
  end
  return function(msg)
    local now = core.now() // 1000
    if now ~= second then second, logged = now, 0 end
    if logged < per_second then
      logged = logged + 1
      emit(level, "%s", msg)
      return
    end
    dropped = dropped + 1
    if dropped > 1 then return end
    -- the first one dropped: tell the count once the second is over
    core.spawn(function()
      core.sleep(math.max(1, (second + 1) * 1000 - core.now()))
      flush()
    end)
  end, flush
end

return log
