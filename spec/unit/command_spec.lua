local command = require "tenement.command"

describe("command.argv", function()
  it("splits a plain command and appends args verbatim", function()
    assert.are.same({ "./server", "--port", "80", "a b", "$HOME" },
      command.argv("./server   --port 80", { "a b", "$HOME" }))
  end)

  it("runs shell syntax through sh -c with exec, args quoted", function()
    local argv = command.argv("uv run app.py > log 2>&1", { "it's", "x" })
    assert.are.same({ "/bin/sh", "-c", "exec uv run app.py > log 2>&1 'it'\\''s' x" }, argv)
    for _, cmd in ipairs { "a | b", "a && b", "a; b", "echo $X", "echo `x`", "echo 'q'",
      'echo "q"', "ls *.py", "FOO=1 app", "app # note", "(app)", "app ~/x", "echo {a,b}" } do
      assert.are.equal("/bin/sh", command.argv(cmd)[1], cmd)
    end
  end)

  it("does not exec a command list, which would run only its first part", function()
    assert.are.same({ "/bin/sh", "-c", "test -f x && exec ./app" }, command.argv("test -f x && exec ./app"))
    assert.are.same({ "/bin/sh", "-c", "a; b" }, command.argv("a; b"))
    assert.are.same({ "/bin/sh", "-c", "a | b" }, command.argv("a | b"))
    assert.are.same({ "/bin/sh", "-c", "exec echo 'a;b'" }, command.argv("echo 'a;b'"))
    assert.are.same({ "/bin/sh", "-c", "exec app > log 2>&1" }, command.argv("app > log 2>&1"))
  end)

  it("puts variable assignments before exec, where the shell reads them as assignments", function()
    assert.are.same({ "/bin/sh", "-c", "FOO=1 BAR='a b' exec ./app --x" },
      command.argv("FOO=1 BAR='a b' ./app --x"))
    assert.are.same({ "/bin/sh", "-c", [[A="x \" y" B=c\ d exec env]] },
      command.argv([[A="x \" y" B=c\ d env]]))
    local argv = command.argv("TEN_SPEC_FOO=bar env", {})
    local p = io.popen(table.concat({ argv[1], argv[2], command.quote(argv[3]) }, " "))
    local out = p:read("a")
    p:close()
    assert.matches("TEN_SPEC_FOO=bar", out, 1, true)
  end)

  it("does not add exec to a command that starts with exec itself", function()
    assert.are.same({ "/bin/sh", "-c", "exec ./app > log" }, command.argv("exec ./app > log"))
    assert.are.same({ "/bin/sh", "-c", "FOO=1 exec ./app" }, command.argv("FOO=1 exec ./app"))
    -- exec is a shell builtin, not a program execve could find
    assert.are.same({ "/bin/sh", "-c", "exec ./app 'a b'" }, command.argv("exec ./app", { "a b" }))
    assert.are.same({ "./executor", "x" }, command.argv("./executor x"))
  end)

  it("rejects an empty command", function()
    assert.are.same({ nil, "command is empty" }, { command.argv("   ") })
    assert.are.same({ nil, "command is empty" }, { command.argv("") })
  end)

  it("quotes for the shell so the argument survives exactly", function()
    for _, s in ipairs { "plain", "", "two words", "it's", "$(rm -rf /)", "a\nb", "back\\slash" } do
      local p = io.popen("printf '%s' " .. command.quote(s))
      local out = p:read("a")
      p:close()
      assert.are.equal(s, out)
    end
  end)
end)
