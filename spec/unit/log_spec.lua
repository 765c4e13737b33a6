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

  it("shows controls an app wrote by their codes, C1 ones in UTF-8 too, and leaves other text alone", function()
    assert.are.equal("\\x1b[31mred\\x1b[0m\tok \\x07\\x7f", log.printable("\27[31mred\27[0m\tok \7\127"))
    assert.are.equal("\\u009b2J \\u0085 é ß ÿ 中", log.printable("\u{9b}2J \u{85} é ß ÿ 中"))
  end)

  it("keeps an app's colours for a terminal, and shows every other control by its code", function()
    assert.are.equal("\27[31mred\27[0m plain \27[1;38;5;208mbold\27[0m",
      log.printable_coloured("\27[31mred\27[0m plain \27[1;38;5;208mbold"))
    -- moving the cursor, clearing the screen, a title: not colours
    assert.are.equal("\\x1b[2J\\x1b[H\\x1b]0;t\\x07 x", log.printable_coloured("\27[2J\27[H\27]0;t\7 x"))
    assert.are.equal("no colour", log.printable_coloured("no colour"))
  end)

  it("keeps a message with a bad format as it is", function()
    log.info("100%")
    assert.matches(" info 100%%\n$", lines[1])
  end)
end)
