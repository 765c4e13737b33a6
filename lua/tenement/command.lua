-- Turning a service's `command` (and `args`) into an argv.
-- A plain command is split on white space and executed directly. One with
-- shell syntax runs as `/bin/sh -c 'exec ...'`: the shell replaces itself
-- with the app, so signals reach the app and no shell lingers as its parent.
-- A command list (`a && b`, `a; b`, a pipeline) cannot be exec'd as a whole:
-- it runs as written under sh, and the signals to the instance's process
-- group reach every part of it.
local command = {}

-- Anything the shell would interpret: quoting, expansion, redirection,
-- pipelines, lists, globbing, comments, assignments, subshells.
local SHELL_SYNTAX = "[|&;<>()$`\\\"'*?%[%]#~=%%{}!\n]"

-- `exec` is a shell builtin: no program of that name exists for execve.
local function starts_with_exec(cmd, from)
  return cmd:find("^exec%f[%s\0]", from or cmd:match("^%s*()")) ~= nil
end

function command.needs_shell(cmd)
  return cmd:find(SHELL_SYNTAX) ~= nil or starts_with_exec(cmd)
end

-- Single-quote s for /bin/sh.
function command.quote(s)
  if s ~= "" and not s:find("[^%w%-_./:,+@]") then return s end
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- command.argv(cmd, args) -> argv | nil, err
-- Operators that make a list or pipeline of commands (outside quotes, as
-- far as a simple scan can tell; a false positive only costs the exec).
local function is_list(cmd)
  local unquoted = cmd:gsub("'[^']*'", "''"):gsub('"[^"]*"', '""')
  -- redirections such as 2>&1 and &> are not lists
  unquoted = unquoted:gsub("[<>]&%d*%-?", ">"):gsub("&>>?", ">")
  return unquoted:find("[;&|\n()]") ~= nil or unquoted:find("^%s*!") ~= nil
end

-- Where the command proper starts, after any leading `NAME=value` words:
-- `exec FOO=1 app` would look for a program named "FOO=1", so exec goes
-- after them (`FOO=1 exec app` sets FOO for the app). Values may be quoted.
local function after_assignments(cmd)
  local i = cmd:match("^%s*()")
  while true do
    local j = cmd:match("^[A-Za-z_][A-Za-z0-9_]*=()", i)
    if not j then return i end
    while j <= #cmd and not cmd:sub(j, j):find("%s") do
      local c = cmd:sub(j, j)
      if c == "'" then
        j = (cmd:find("'", j + 1, true) or #cmd) + 1
      elseif c == '"' then
        j = j + 1
        while j <= #cmd and cmd:sub(j, j) ~= '"' do
          j = j + (cmd:sub(j, j) == "\\" and 2 or 1)
        end
        j = j + 1
      else
        j = j + (c == "\\" and 2 or 1)
      end
    end
    i = cmd:match("^%s*()", j)
  end
end

function command.argv(cmd, args)
  args = args or {}
  if type(cmd) ~= "string" or not cmd:find("%S") then
    return nil, "command is empty"
  end
  if command.needs_shell(cmd) then
    local parts = { cmd }
    if not is_list(cmd) then
      local at = after_assignments(cmd)
      if not starts_with_exec(cmd, at) then
        parts[1] = cmd:sub(1, at - 1) .. "exec " .. cmd:sub(at)
      end
    end
    for _, a in ipairs(args) do parts[#parts + 1] = command.quote(a) end
    return { "/bin/sh", "-c", table.concat(parts, " ") }
  end
  local argv = {}
  for word in cmd:gmatch("%S+") do argv[#argv + 1] = word end
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return argv
end

return command
