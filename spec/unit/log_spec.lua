local log = require "tenement.log"

describe("log", function()
  local lines
  before_each(function()
    lines = {}
    log.set_sink { write = function(_, ...) lines[#lines + 1] = table.concat { ... } end }
  end)
  after_each(function() log.set_sink(nil) end)

  it("writes one line per event, whatever the message quotes", function()
    log.error("%s did not start: %s", "web:a", "exited with code 1\nlast output:\n  stdout: up\r\n  stderr: gone")
    assert.are.equal(1, #lines)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ error web:a did not start: exited with code 1 | last output: "
      .. "| stdout: up | stderr: gone\n$", lines[1])
  end)

  it("keeps a message with a bad format as it is", function()
    log.info("100%")
    assert.matches(" info 100%%\n$", lines[1])
  end)
end)
