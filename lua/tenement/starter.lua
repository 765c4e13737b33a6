-- `ten init`: a starter tenement.toml for the app in a directory.
local core = require "tenement.core"
local config = require "tenement.config"

local starter = {}

local function exists(dir, name) return core.fs.stat(dir .. "/" .. name) ~= nil end

-- Whether a program is on the PATH ten init runs with.
local function on_path(prog)
  for d in (os.getenv("PATH") or ""):gmatch("[^:]+") do
    if core.fs.access(d .. "/" .. prog, "x") then return true end
  end
  return false
end

-- The Python file that starts the app: the first of the usual names there.
local PYTHON_ENTRIES = { "app.py", "main.py", "server.py", "run.py" }

-- What kind of app lives in dir, and the command that starts it.
-- -> kind, command, note
function starter.detect(dir)
  local entry
  for _, f in ipairs(PYTHON_ENTRIES) do
    if exists(dir, f) then entry = f break end
  end
  local project, reqs = exists(dir, "pyproject.toml"), exists(dir, "requirements.txt")
  if project or reqs or entry then
    local named = entry or "app.py"
    local unnamed = not entry and ("; no " .. table.concat(PYTHON_ENTRIES, ", ") .. " here: put yours in command")
      or ""
    -- uv where the project is one and uv is installed; else the system's python3
    if project and on_path("uv") then
      return "python", "uv run python " .. named, "uv runs the app in its own environment" .. unnamed
    end
    return "python", "python3 " .. named, (reqs or project)
      and ("install its requirements into a virtualenv and point command at its python" .. unnamed)
      or (unnamed ~= "" and unnamed:sub(3) or nil)
  elseif exists(dir, "package.json") then
    return "node", "npm start", "npm start runs the \"start\" script of package.json"
  elseif exists(dir, "go.mod") then
    return "go", "./" .. (dir:match("([^/]+)$") or "app"), "build it first: go build -o " .. (dir:match("([^/]+)$") or "app")
  elseif exists(dir, "Cargo.toml") then
    local name = dir:match("([^/]+)$") or "app"
    return "rust", "./target/release/" .. name, "build it first: cargo build --release"
  end
  local name = dir:match("([^/]+)$") or "app"
  local st = core.fs.stat(dir .. "/" .. name)
  if st and st.type == "file" and core.fs.access(dir .. "/" .. name, "x") then
    return "binary", "./" .. name, nil
  end
  return nil
end

-- A valid service name from a directory name: lower case, dashes.
function starter.service_name(s)
  s = s:lower():gsub("[^a-z0-9-]+", "-"):gsub("^-+", ""):gsub("-+$", "")
  if s == "" then s = "app" end
  return s:sub(1, 63)
end

-- A TOML basic string: Lua's %q escapes control characters as \ddd, which
-- TOML does not know.
local function toml_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    if c == '"' then return '\\"' end
    if c == "\\" then return "\\\\" end
    if c == "\t" then return "\\t" end
    if c == "\n" then return "\\n" end
    return ("\\u%04X"):format(c:byte())
  end) .. '"'
end

-- starter.generate(dir, {name=, command=, env=}) -> toml text | nil, err
-- env: the variables ${VAR} in the command is checked against (ten init's own
-- environment, the best guess at the one ten serve will have).
function starter.generate(dir, opts)
  local name = opts.name or starter.service_name(dir:match("([^/]+)$") or "app")
  local ok, err = config.valid_name(name)
  if not ok then return nil, "--name " .. name .. ": " .. err end
  local kind, cmd, note = starter.detect(dir)
  cmd = opts.command or cmd
  if not cmd then
    return nil, "cannot tell what app lives in " .. dir .. " (no pyproject.toml, requirements.txt, "
      .. "package.json, go.mod, Cargo.toml or executable named like the directory): "
      .. "give the command with --command CMD"
  end
  local lines = {
    "# tenement.toml for " .. name .. (kind and (" (" .. kind .. " app)") or ""),
    "# Reference: docs/configuration.md. Check it with `ten config`.",
    "",
    "[settings]",
    'data_dir = "/var/lib/tenement"',
    "",
    "[service." .. name .. "]",
    "# The app must listen on the Unix socket in $SOCKET_PATH: requests and health",
    "# checks go there ($PORT is set too, but nothing is sent to it).",
    "command = " .. toml_string(cmd),
  }
  if note then lines[#lines + 1] = "# " .. note end
  lines[#lines + 1] = "workdir = " .. toml_string(dir)
  lines[#lines + 1] = 'health = "/health"'
  lines[#lines + 1] = "idle_timeout = 300"
  lines[#lines + 1] = 'restart = "on-failure"'
  lines[#lines + 1] = "# ten stop deletes the instance's directory ($INSTANCE_DIR); to keep what the app"
  lines[#lines + 1] = "# writes there across stops:"
  lines[#lines + 1] = "# storage_persist = true"
  lines[#lines + 1] = ""
  lines[#lines + 1] = "[instances]"
  lines[#lines + 1] = name .. ' = ["prod"]'
  local text = table.concat(lines, "\n") .. "\n"
  local cfg, cerr, problems = config.parse(text, "tenement.toml", opts.env or {})
  if not cfg then
    -- Only what was given (the command, the directory) can make the file
    -- fail to load: a brace or ${VAR} the templates do not accept, say.
    local what = {}
    for i, p in ipairs(problems or {}) do
      local key = p.text:match("^service%.[^.]+%.(%w+)")
      what[i] = (key == "command" and opts.command and "--command: " or key == "workdir" and
        "the directory: " or "") .. p.text
    end
    return nil, "cannot write a tenement.toml that loads: " .. (#what > 0 and table.concat(what, "; ") or cerr)
  end
  return text
end

return starter
