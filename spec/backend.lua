-- The C test backend (spec/fixtures/backend.c) as the core specs start it:
-- in the background, under a shell that records its pid and exit status.
local core = require "tenement.core"

local backend = {}

backend.PATH = (os.getenv("TEN_BUILD") or "build") .. "/fixtures/backend"

-- backend.start(dir, name, env [, no_wait]) -> { path, out, pid, port, line, code_file }
-- Waits until it says it listens (unless no_wait); env adds variables.
function backend.start(dir, name, env, no_wait)
  name = name or "backend"
  local sock = dir .. "/" .. name .. ".sock"
  local out = dir .. "/" .. name .. ".out"
  local vars = { "SOCKET_PATH='" .. sock .. "'" }
  for _, f in ipairs { out, dir .. "/" .. name .. ".pid", dir .. "/" .. name .. ".code" } do os.remove(f) end
  for k, v in pairs(env or {}) do vars[#vars + 1] = k .. "='" .. v .. "'" end
  local cmd = string.format("cd '%s' && env %s sh -c '%s & echo $! > %s.pid; wait $!; echo $? > %s.code' " ..
    "> '%s' 2>&1 &", dir, table.concat(vars, " "), backend.PATH, name, name, out)
  assert(os.execute(cmd))
  local b = { path = sock, out = out, code_file = dir .. "/" .. name .. ".code" }
  local deadline = core.now() + 5000
  while core.now() < deadline do
    if not b.pid then
      local pf = io.open(dir .. "/" .. name .. ".pid")
      b.pid = pf and pf:read("n")
      if pf then pf:close() end
    end
    local line = (core.fs.read(out) or ""):match("^[^\n]*")
    if b.pid and (no_wait or line:match("^listening on")) then
      b.port = tonumber(line:match("127%.0%.0%.1:(%d+)"))
      b.line = line ~= "" and line or nil
      return b
    end
    core.sleep(5)
  end
  error("the backend did not start: " .. tostring(core.fs.read(out)))
end

-- The backend's exit status once it exited, or nil after timeout ms.
function backend.exit_code(b, timeout)
  local deadline = core.now() + (timeout or 2000)
  repeat
    local text = core.fs.read(b.code_file)
    if text and text:match("%d") then return tonumber(text:match("%d+")) end
    core.sleep(5)
  until core.now() > deadline
  return nil
end

-- Kills the backend and waits for its wrapper shell to write the exit
-- status, so that removing the directory afterwards does not race that write.
function backend.stop(b)
  if not (b and b.pid) then return end
  os.execute("kill -9 " .. b.pid .. " 2>/dev/null")
  local function wait() backend.exit_code(b, 2000) end
  if core.current() then wait() else core.run(wait) end
end

return backend
