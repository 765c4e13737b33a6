-- The ten binary as a user runs it: help, version, config, argument errors.
local support = require "support"

describe("ten CLI", function()
  after_each(support.cleanup)

  it("prints help listing the commands that work", function()
    local code, out = support.ten_run { "--help" }
    assert.are.equal(0, code)
    assert.matches("Usage: ten", out, 1, true)
    for _, cmd in ipairs { "config", "serve", "spawn", "stop", "ps", "logs", "init", "help" } do
      assert.matches("\n  " .. cmd .. " ", out, 1, true)
    end
  end)

  it("says when no server answers that no file named another data directory", function()
    local dir = support.tmpdir()
    -- an empty directory, no TENEMENT_* variables: the default data directory
    local code, _, err = support.run("cd " .. support.quote(dir) .. " && " .. support.clean_env() .. " "
      .. support.quote(support.ten) .. " ps")
    assert.are.equal(1, code)
    assert.matches("(there is no ./tenement.toml, so that is the default data directory: give --config FILE or "
      .. "--data-dir DIR for another)", err, 1, true)
    -- with a file that names one, not a word of it
    support.write(dir .. "/tenement.toml", '[settings]\ndata_dir = "' .. dir .. '/d"\n')
    code, _, err = support.run("cd " .. support.quote(dir) .. " && " .. support.clean_env() .. " "
      .. support.quote(support.ten) .. " ps")
    assert.are.equal(1, code)
    assert.is_nil(err:find("default data directory", 1, true), err)
  end)

  it("prints the version", function()
    local code, out = support.ten_run { "--version" }
    assert.are.equal(0, code)
    assert.matches("^ten %d+%.%d+%.%d+\n$", out)
  end)

  it("explains an unknown command with a suggestion", function()
    local code, _, err = support.ten_run { "confg" }
    assert.are.equal(2, code)
    assert.matches("unknown command 'confg' (did you mean 'config'?)", err, 1, true)
    -- the beginning of a command's name: every command it begins
    code, _, err = support.ten_run { "toke" }
    assert.are.equal(2, code)
    assert.matches("unknown command 'toke' (did you mean 'token-gen' or 'token-list' or 'token-revoke'?)", err, 1,
      true)
    code, _, err = support.ten_run { "help", "sp" }
    assert.are.equal(2, code)
    assert.matches("unknown command 'sp' (did you mean 'spawn'?)\nRun 'ten --help' for the list of commands.", err, 1,
      true)
    -- an option of the command before it: its value was taken for the command
    code, _, err = support.ten_run { "-p", "8080", "serve", "--listen", "0.0.0.0" }
    assert.are.equal(2, code)
    assert.matches("unknown command '8080' (options other than --config, --data-dir, --server and --token go after "
      .. "the command: ten serve -p 8080 --listen 0.0.0.0)", err, 1, true)
  end)

  it("explains an unknown option with usage", function()
    local code, _, err = support.ten_run { "config", "--jsn" }
    assert.are.equal(2, code)
    assert.matches("unknown option '--jsn' (did you mean --json?)", err, 1, true)
    assert.matches("Usage: ten config", err, 1, true)
  end)

  it("refuses a line count the store would cut without a word", function()
    for _, n in ipairs { "0", "10001", "2.5" } do
      local code, out, err = support.ten_run { "logs", "-n", n }
      assert.are.equal(2, code, n)
      assert.are.equal("", out)
      assert.matches("ten logs: --lines " .. n .. ": expected a whole number from 1 to 10000", err, 1, true)
    end
  end)

  -- tonumber reads them all as numbers: "weight 16" for 0x10
  it("takes counts and weights in decimal digits only", function()
    for _, n in ipairs { "0x10", "1e1", " 7", "7 ", "+7", "-0" } do
      local code, _, err = support.ten_run { "deploy", "api:v2", "-w", n }
      assert.are.equal(2, code, n)
      assert.matches("expected a whole number from 0 to 100", err, 1, true)
      code, _, err = support.ten_run { "logs", "-n", n }
      assert.are.equal(2, code, n)
      assert.matches("expected a whole number from 1 to 10000", err, 1, true)
    end
  end)

  it("ten help COMMAND shows the command's options", function()
    local code, out = support.ten_run { "help", "logs" }
    assert.are.equal(0, code)
    assert.matches("--follow", out, 1, true)
    local code2, _, err2 = support.ten_run { "help", "nope" }
    assert.are.equal(2, code2)
    assert.matches("unknown command 'nope'", err2, 1, true)
    local code3, out3, err3 = support.ten_run { "help", "logs", "extra" }
    assert.are.equal(2, code3)
    assert.are.equal("", out3)
    assert.matches("ten help: unexpected argument 'extra'", err3, 1, true)
  end)

  it("ten config prints the resolved file and JSON", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/tenement.toml", '[service.api]\ncommand = "./api"\n[instances]\napi = ["prod"]\n')
    local code, out = support.ten_run({ "config" }, { TENEMENT_CONFIG = path })
    assert.are.equal(0, code)
    assert.matches("[service.api]", out, 1, true)
    assert.matches('restart = "on-failure"', out, 1, true)
    local code2, out2 = support.ten_run { "config", "--json", "--config", path }
    assert.are.equal(0, code2)
    local cjson = require "cjson"
    local cfg = cjson.decode(out2)
    assert.are.equal("./api", cfg.services.api.command)
    assert.are.equal(10, cfg.settings.health_check_interval)
    assert.are.equal("prod", cfg.instances[1].id)
  end)

  it("ten config says what loads but is rarely meant, and still exits 0", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/tenement.toml", '[service.api]\ncommand = "/bin/sh"\n[routing.path]\n'
      .. '"/api" = "api"\n')
    local code, out, err = support.ten_run { "config", "--json", "--config", path }
    assert.are.equal(0, code)
    assert.are.equal(1, err:find("warning: " .. path .. ':4: [routing.path] "/api" takes /api/ from the server', 1, true))
    assert.are.equal(1, #require("cjson").decode(out).warnings)
  end)

  it("ten config shows the data_dir that --data-dir or $TENEMENT_DATA_DIR gives ten serve", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/tenement.toml", '[settings]\ndata_dir = "from-file"\n')
    local code, out, err = support.ten_run { "config", "--config", path, "--data-dir", dir .. "/flag" }
    assert.are.equal(0, code, err)
    assert.matches('data_dir = "' .. dir .. '/flag"', out, 1, true)
    code, out, err = support.ten_run({ "config", "--config", path }, { TENEMENT_DATA_DIR = dir .. "/env" })
    assert.are.equal(0, code, err)
    assert.matches('data_dir = "' .. dir .. '/env"', out, 1, true)
  end)

  it("ten config exits 1 with every error, file and line", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/bad.toml",
      '[service.api]\ncommand = "./api"\nrestart = "sometimes"\nhelth = "/h"\n')
    local code, out, err = support.ten_run { "config", "--config", path }
    assert.are.equal(1, code)
    assert.are.equal("", out)
    assert.matches(path .. ':3:11: service.api.restart = "sometimes": expected one of always, on-failure, never', err, 1, true)
    assert.matches(path .. ":4:1: service.api.helth", err, 1, true)
    assert.matches('did you mean "health"', err, 1, true)
  end)

  it("ten config on a missing file says how to make one", function()
    local code, _, err = support.ten_run { "config", "--config", "/nonexistent/tenement.toml" }
    assert.are.equal(1, code)
    assert.matches("/nonexistent/tenement.toml", err, 1, true)
    assert.matches("ten init", err, 1, true)
  end)

  -- a 5000-character name made every row of token-list as wide; escape
  -- sequences in a description drove the terminal that listed it
  it("bounds a token's name and description, and lists stored text without control characters", function()
    local dir = support.tmpdir()
    local code, out, err = support.ten_run { "token-gen", "--data-dir", dir .. "/d", "--name", string.rep("n", 65) }
    assert.are.same({ 2, "" }, { code, out })
    assert.matches("--name may hold up to 64 letters", err, 1, true)
    for _, text in ipairs { string.rep("d", 201), "evil\27[2J\7", "two\nlines" } do
      code, out, err = support.ten_run { "token-gen", "--data-dir", dir .. "/d", "--description", text }
      assert.are.same({ 2, "" }, { code, out })
      assert.matches("--description is one line of at most 200 bytes, without control characters", err, 1, true)
    end
    assert.is_nil(io.open(dir .. "/d/tenement.db"))
    -- one an earlier version stored
    assert.are.equal(0, (support.ten_run { "token-gen", "--data-dir", dir .. "/d", "--name", "old" }))
    require("tenement.core").run(function()
      local st = assert(require("tenement.store").open(dir .. "/d/tenement.db"))
      assert(st.conn:run("UPDATE tokens SET description = ? WHERE name = 'old'", "evil\27[2J\7\nline2"))
      st:close()
    end)
    code, out = support.ten_run { "token-list", "--data-dir", dir .. "/d" }
    assert.are.equal(0, code)
    assert.matches("evil\\x1b[2J\\x07\\x0aline2\n", out, 1, true)
  end)

  it("refuses --server and --token for commands that never talk to a server", function()
    local dir = support.tmpdir()
    local code, out, err = support.ten_run { "token-gen", "--server", "http://127.0.0.1:1", "--data-dir", dir .. "/d" }
    assert.are.equal(2, code)
    assert.are.equal("", out)
    assert.matches("ten token-gen: --server does not apply", err, 1, true)
    assert.is_nil(io.open(dir .. "/d/tenement.db"))
    code, _, err = support.ten_run { "config", "--token", "t", "--config", "/nonexistent/t.toml" }
    assert.are.equal(2, code)
    assert.matches("ten config: --token does not apply", err, 1, true)
  end)

  it("client commands need only data_dir from the file, not ten serve's ${VAR}s", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/tenement.toml", '[settings]\ndata_dir = "data"\n'
      .. '[service.api]\ncommand = "./api"\n[service.api.env]\nSECRET_KEY = "${SECRET_KEY}"\n')
    local code, _, err = support.ten_run { "ps", "--config", path }
    assert.are.equal(1, code)
    assert.is_nil(err:find("SECRET_KEY", 1, true), err)
    assert.matches("no ten server is running for this data directory (" .. dir .. "/data/ten.sock", err, 1, true)
    -- and without a [settings] section, the default data_dir
    path = support.write(dir .. "/nosettings.toml", '[service.api]\ncommand = "./api"\n'
      .. '[service.api.env]\nSECRET_KEY = "${SECRET_KEY}"\n')
    _, _, err = support.ten_run { "ps", "--config", path }
    assert.is_nil(err:find("SECRET_KEY", 1, true), err)
  end)

  -- A server runs on with the file it read; an edit in progress that breaks
  -- the file must not leave the operator without a way to it.
  it("client commands on a file that is not TOML give the error and the way round it", function()
    local dir = support.tmpdir()
    local path = support.write(dir .. "/tenement.toml", '[settings]\ndata_dir = "data"\n[service.a]\ncommand = "x\n')
    local code, _, err = support.ten_run { "ps", "--config", path }
    assert.are.equal(1, code)
    assert.matches(path .. ":4:11: unterminated string", err, 1, true)
    assert.matches("ten ps: the server's data directory is read from " .. path .. ": fix the file, or name the "
      .. "directory with --data-dir DIR (or $TENEMENT_DATA_DIR)\n", err, 1, true)
    -- which works
    code, _, err = support.ten_run { "ps", "--config", path, "--data-dir", dir .. "/data" }
    assert.are.equal(1, code)
    assert.matches("no ten server is running for this data directory (" .. dir .. "/data/ten.sock", err, 1, true)
  end)

  it("client commands on a missing config file give the reason and the fix", function()
    local code, _, err = support.ten_run { "ps", "--config", "/nonexistent/tenement.toml" }
    assert.are.equal(1, code)
    assert.matches("cannot read config file /nonexistent/tenement.toml: No such file or directory;", err, 1, true)
    assert.matches("ten init", err, 1, true)
  end)

  it("finds ./tenement.toml when nothing else is named", function()
    local dir = support.tmpdir()
    support.write(dir .. "/tenement.toml", '[service.web]\ncommand = "./web"\n')
    local code, out = support.run("cd " .. support.quote(dir) .. " && " .. support.clean_env() .. " " ..
      support.quote(support.ten) .. " config")
    assert.are.equal(0, code)
    assert.matches("[service.web]", out, 1, true)
  end)

  it("client commands without a server say so and how to start one", function()
    local dir = support.tmpdir()
    local code, _, err = support.ten_run { "ps", "--data-dir", dir }
    assert.are.equal(1, code)
    assert.matches("no ten server is running", err, 1, true)
    assert.matches("ten serve", err, 1, true)
  end)

  it("rejects a bad SERVICE:ID before contacting anything", function()
    local dir = support.tmpdir()
    local code, _, err = support.ten_run { "stop", "../etc:x", "--data-dir", dir }
    assert.are.equal(2, code)
    assert.matches("not a valid name", err, 1, true)
    local code2, _, err2 = support.ten_run { "spawn", "api", "--data-dir", dir }
    assert.are.equal(2, code2)
    assert.matches("SERVICE:ID", err2, 1, true)
    -- an option's missing value is not taken from the next option
    local code3, _, err3 = support.ten_run { "spawn", "api", "--id", "--data-dir", dir }
    assert.are.equal(2, code3)
    assert.matches("ten spawn: option '--id' needs a value (ID)", err3, 1, true)
  end)

  describe("ten serve as the command line and the file set it up", function()
    local pid

    -- Starts ten serve in the background with extra arguments and environment.
    local function serve(dir, args, env)
      local parts = { support.clean_env() }
      for k, v in pairs(env or {}) do parts[#parts + 1] = k .. "=" .. support.quote(v) end
      parts[#parts + 1] = support.quote(support.ten) .. " serve"
      for _, a in ipairs(args) do parts[#parts + 1] = support.quote(a) end
      local p = io.popen(table.concat(parts, " ") .. " >" .. support.quote(dir .. "/serve.log") .. " 2>&1 & echo $!")
      pid = tonumber(p:read("l"))
      p:close()
    end

    local function wait_up(args, env)
      for _ = 1, 100 do
        if support.ten_run(args, env) == 0 then return true end
        support.sleep(0.05)
      end
      return false
    end

    after_each(function()
      if pid then os.execute("kill -KILL " .. pid .. " 2>/dev/null") end
      pid = nil
    end)

    it("uses $TENEMENT_DATA_DIR, as the client commands do", function()
      local dir = support.tmpdir()
      local cfg = support.write(dir .. "/tenement.toml",
        '[settings]\ndata_dir = "from-file"\nport = ' .. support.free_port() .. "\n")
      local env = { TENEMENT_DATA_DIR = dir .. "/from-env" }
      serve(dir, { "--config", cfg }, env)
      assert.is_true(wait_up({ "ps", "--config", cfg }, env), "ten ps did not find the server")
      assert.is_true(os.execute("test -S " .. support.quote(dir .. "/from-env/ten.sock")))
    end)

    it("says that [settings.tls] enabled = true does not give HTTPS", function()
      local dir = support.tmpdir()
      local cfg = support.write(dir .. "/tenement.toml", table.concat({
        "[settings]", 'data_dir = "data"', "port = " .. support.free_port(),
        "[settings.tls]", "enabled = true", 'acme_email = "a@example.com"', 'domain = "example.com"',
      }, "\n") .. "\n")
      serve(dir, { "--config", cfg })
      assert.is_true(wait_up { "ps", "--config", cfg }, "ten serve did not come up")
      local log = assert(io.open(dir .. "/serve.log")):read("a")
      assert.matches("settings.tls.enabled = true: HTTPS is not served", log, 1, true)
    end)

    it("accepts the original's --tls, --email and --staging, checked like the file", function()
      local dir = support.tmpdir()
      local cfg = support.write(dir .. "/tenement.toml",
        '[settings]\ndata_dir = "data"\nport = ' .. support.free_port() .. "\n")
      local code, _, err = support.ten_run { "serve", "--config", cfg, "--tls", "--domain", "example.com" }
      assert.are.equal(2, code)
      assert.matches("ten serve: --tls: settings.tls.acme_email: missing", err, 1, true)
      assert.matches("--email", err, 1, true)
      code, _, err = support.ten_run { "serve", "--config", cfg, "--tls", "--email", "nope", "--domain", "example.com" }
      assert.are.equal(2, code)
      assert.matches('--email nope: expected an email address like "admin@example.com"', err, 1, true)
      serve(dir, { "--config", cfg, "--tls", "--email", "a@example.com", "--domain", "example.com", "--staging" })
      assert.is_true(wait_up { "ps", "--config", cfg }, "ten serve did not come up")
      local log = assert(io.open(dir .. "/serve.log")):read("a")
      assert.matches("settings.tls.enabled = true: HTTPS is not served", log, 1, true)
    end)

    it("keeps --port and --domain across ten reload", function()
      local dir = support.tmpdir()
      local cfg = support.write(dir .. "/tenement.toml",
        '[settings]\ndata_dir = "data"\nport = ' .. support.free_port() .. "\n")
      local port = support.free_port()
      serve(dir, { "--config", cfg, "--port", tostring(port), "--domain", "example.test" })
      assert.is_true(wait_up { "ps", "--config", cfg }, "ten serve did not come up")
      local function health_status()
        return require("tenement.core").run(function()
          local c = support.raw(port)
          c:send("GET /health HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
          local res = assert(c:response())
          c:close()
          return res.status
        end)
      end
      assert.are.equal(200, health_status())
      local code, out, err = support.ten_run { "reload", "--config", cfg }
      assert.are.equal(0, code, err)
      assert.is_nil(out:find("needs a restart", 1, true), out)
      assert.are.equal(200, health_status())
      -- what ten config would warn of, the operator who reloads is told too
      support.write(cfg, support.read(cfg) .. '[service.w]\ncommand = "/bin/sh"\nmax_instances = 2\n')
      code, _, err = support.ten_run { "reload", "--config", cfg }
      assert.are.equal(0, code, err)
      assert.matches("warning: " .. cfg:gsub("%p", "%%%0") .. ":%d+: service%.w%.max_instances limits the instances "
        .. "requests create", err)
      -- another file finds the same server (its data_dir), which reads its
      -- own: said, where it passed as applied
      local other = support.write(dir .. "/other.toml", support.read(cfg) .. "[service.more]\ncommand = \"/bin/sh\"\n")
      code, _, err = support.ten_run { "reload", "--config", other }
      assert.are.equal(1, code)
      assert.matches("ten reload: the server read its own file, " .. cfg .. ", not " .. other
        .. ": a reload re-reads the file ten serve was started with", err, 1, true)
      -- and its own file gone: said so, without config.load's advice to name another
      os.rename(cfg, cfg .. ".away")
      code, _, err = support.ten_run { "reload", "--config", other }
      assert.are.equal(1, code)
      assert.matches(cfg .. ", the file ten serve was started with, is not there: a reload re-reads it; put it back",
        err, 1, true)
      os.rename(cfg .. ".away", cfg)
    end)
  end)

  describe("ten init", function()
    local function init_in(dir, ...)
      local args = { ... }
      local parts = { "cd " .. support.quote(dir) .. " && " .. support.clean_env() .. " " ..
        support.quote(support.ten) .. " init" }
      for _, a in ipairs(args) do parts[#parts + 1] = support.quote(a) end
      return support.run(table.concat(parts, " "))
    end

    it("detects a Node app and writes a file that loads", function()
      local dir = support.tmpdir() .. "/My_Shop"
      os.execute("mkdir -p " .. support.quote(dir))
      support.write(dir .. "/package.json", "{}")
      local code, out, err = init_in(dir)
      assert.are.equal(0, code, err)
      assert.matches("[service.my-shop]", out, 1, true)
      assert.matches('command = "npm start"', out, 1, true)
      local cfg_code = support.ten_run { "config", "--config", dir .. "/tenement.toml" }
      assert.are.equal(0, cfg_code)
    end)

    it("detects Python, Go and Rust projects", function()
      -- uv only where it is installed (ten init runs with a PATH of /usr/bin:/bin here)
      local uv = os.execute("command -v uv >/dev/null 2>&1") and "uv run python" or "python3"
      for files, command in pairs {
        [{ "pyproject.toml" }] = uv .. " app.py",
        [{ "pyproject.toml", "main.py" }] = uv .. " main.py",
        [{ "app.py" }] = "python3 app.py",
        [{ "requirements.txt", "server.py" }] = "python3 server.py",
        [{ "go.mod" }] = "./app",
        [{ "Cargo.toml" }] = "./target/release/app",
      } do
        local dir = support.tmpdir() .. "/app"
        os.execute("mkdir -p " .. support.quote(dir))
        for _, file in ipairs(files) do support.write(dir .. "/" .. file, "") end
        local code, out = init_in(dir)
        assert.are.equal(0, code)
        assert.matches('command = "' .. command .. '"', out, 1, true)
      end
    end)

    it("writes any command as a TOML string that loads, and says why one cannot be used", function()
      local dir = support.tmpdir()
      local code, out, err = init_in(dir, "--command", "./app\targ", "--name", "web")
      assert.are.equal(0, code, err)
      assert.matches('command = "./app\\targ"', out, 1, true)
      assert.are.equal(0, (support.ten_run { "config", "--config", dir .. "/tenement.toml" }))
      -- ${VAR} is read from the environment ten init runs in, as ten serve will
      code, _, err = support.run("cd " .. support.quote(dir) .. " && " .. support.clean_env()
        .. " APP_BIN=/opt/app " .. support.quote(support.ten) .. " init --force --command '${APP_BIN}/server'")
      assert.are.equal(0, code, err)
      code, _, err = init_in(dir, "--command", "./app --port ${PORT}", "--force")
      assert.are.equal(1, code)
      assert.is_nil(err:find("a bug", 1, true), err)
      assert.matches("--command", err, 1, true)
      assert.matches("write {port}", err, 1, true)
    end)

    it("writes the file --config names", function()
      local dir = support.tmpdir()
      os.execute("mkdir -p " .. support.quote(dir .. "/etc"))
      local code, out, err = init_in(dir, "--command", "./x", "--name", "web", "--config", dir .. "/etc/ten.toml")
      assert.are.equal(0, code, err)
      assert.matches("wrote " .. dir .. "/etc/ten.toml", out, 1, true)
      assert.is_nil(io.open(dir .. "/tenement.toml"))
      assert.are.equal(0, (support.ten_run { "config", "--config", dir .. "/etc/ten.toml" }))
      -- a name that cannot be one is a usage error, said before looking at the app
      code, _, err = init_in(dir, "--name", "Bad Name")
      assert.are.equal(2, code)
      assert.matches('ten init: --name Bad Name: not a valid name: uppercase "B" is not allowed', err, 1, true)
    end)

    it("refuses to overwrite without --force, and says what to do when it cannot tell", function()
      local dir = support.tmpdir()
      local code, _, err = init_in(dir)
      assert.are.equal(1, code)
      assert.matches("--command", err, 1, true)
      code = init_in(dir, "--command", "./server --port $PORT", "--name", "web")
      assert.are.equal(0, code)
      code, _, err = init_in(dir, "--command", "./x")
      assert.are.equal(1, code)
      assert.matches("already exists", err, 1, true)
      code = init_in(dir, "--command", "./x", "--force")
      assert.are.equal(0, code)
      code, _, err = init_in(dir, "--name", "Bad_Name", "--command", "./x", "--force")
      assert.are.equal(2, code)
      assert.matches("not a valid name", err, 1, true)
    end)
  end)
end)
