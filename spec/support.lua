-- Helpers shared by the specs: temp dirs, running the ten binary.
local support = {}

local build = os.getenv("TEN_BUILD") or "build"
support.ten = os.getenv("TEN") or (build .. "/ten")
support.build = build

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
support.quote = sh_quote

-- A fresh directory, removed by support.cleanup().
local made = {}
function support.tmpdir()
  local p = io.popen("mktemp -d " .. sh_quote((os.getenv("TMPDIR") or "/tmp") .. "/tenement-spec.XXXXXX"))
  local dir = p:read("l")
  p:close()
  made[#made + 1] = dir
  return dir
end

function support.cleanup()
  for _, d in ipairs(made) do os.execute("rm -rf " .. sh_quote(d)) end
  made = {}
end

function support.write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
  return path
end

-- Runs a shell command; -> exit code, stdout, stderr
function support.run(cmd)
  local dir = support.tmpdir()
  local code = select(3, os.execute(cmd .. " >" .. dir .. "/out 2>" .. dir .. "/err"))
  local function slurp(p) local f = io.open(p) local s = f:read("a") f:close() return s end
  return code, slurp(dir .. "/out"), slurp(dir .. "/err")
end

-- "env -i PATH=..." for running ten as a user would, with an empty
-- environment, but keeping the sanitizers' settings under `make asan`.
function support.clean_env()
  local parts = { "env -i PATH=/usr/local/bin:/usr/bin:/bin" }
  for _, name in ipairs { "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" } do
    local v = os.getenv(name)
    if v then parts[#parts + 1] = name .. "=" .. sh_quote(v) end
  end
  return table.concat(parts, " ")
end

-- Runs the ten binary with args (a list) and an optional environment prefix.
function support.ten_run(args, env)
  local parts = { support.clean_env() }
  for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. sh_quote(v) end
  parts[#parts + 1] = sh_quote(support.ten)
  for _, a in ipairs(args) do parts[#parts + 1] = sh_quote(a) end
  return support.run(table.concat(parts, " "))
end

-- Pids of live (not zombie) processes in process group pgid. Zombies are
-- dead already; whoever they were reparented to reaps them in its own time.
function support.live_in_group(pgid)
  local live = {}
  local p = io.popen("ls /proc")
  for name in p:lines() do
    if name:match("^%d+$") then
      local f = io.open("/proc/" .. name .. "/stat")
      local stat = f and f:read("a")
      if f then f:close() end
      -- pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
      local state, pgrp
      if stat then state, pgrp = stat:match("%) (%S) %d+ (%d+)") end
      if state and state ~= "Z" and tonumber(pgrp) == pgid then live[#live + 1] = tonumber(name) end
    end
  end
  p:close()
  return live
end

-- A TCP port free right now on 127.0.0.1 (for a server a spec starts).
function support.free_port()
  local core = require "tenement.core"
  local l = assert(core.net.listen { host = "127.0.0.1", port = 0 })
  local port = l:port()
  l:close()
  return port
end

return support
