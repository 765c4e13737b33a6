-- The server's own log: one line per event on stderr, with time and level.
-- (Instances' output is captured separately, by core.logbuf.)
local log = {}

local levels = { debug = 1, info = 2, warn = 3, error = 4 }
local threshold = levels[os.getenv("TENEMENT_LOG_LEVEL") or "info"] or levels.info
local sink = io.stderr

function log.set_level(name)
  threshold = assert(levels[name], "unknown log level " .. tostring(name))
end

-- For specs: where the lines go (anything with :write).
function log.set_sink(s) sink = s or io.stderr end

local function emit(level, fmt, ...)
  if levels[level] < threshold then return end
  local ok, msg = pcall(string.format, fmt, ...)
  if not ok then msg = fmt end
  sink:write(os.date("!%Y-%m-%dT%H:%M:%SZ"), " ", level, " ", msg, "\n")
  if sink.flush then sink:flush() end
end

function log.debug(fmt, ...) emit("debug", fmt, ...) end
function log.info(fmt, ...) emit("info", fmt, ...) end
function log.warn(fmt, ...) emit("warn", fmt, ...) end
function log.error(fmt, ...) emit("error", fmt, ...) end

return log
