-- core.logbuf: capture of instances' stdout/stderr into rings and a sink.
--
-- Children are real processes started by the shell with their stdout and
-- stderr on the write ends of our pipes (reached through /proc/<pid>/fd, as
-- the write ends are close-on-exec). Where a test needs bytes at exact
-- moments, Lua writes into the pipe itself through the same path.
local core = require "tenement.core"
local lb = core.logbuf
local fs = core.fs

local PID = assert(fs.realpath("/proc/self")):match("(%d+)$")
local FLOOD = (os.getenv("TEN_BUILD") or "build") .. "/fixtures/flood"
local MARK = " \u{2026}[truncated]"

local function fd_count()
  return #assert(fs.readdir("/proc/self/fd"))
end

-- Run `cmd` in the background with stdout on out_fd and stderr on err_fd.
local function start(cmd, out_fd, err_fd)
  local redir = ("exec >/proc/%s/fd/%d"):format(PID, out_fd)
  if err_fd then redir = redir .. (" 2>/proc/%s/fd/%d"):format(PID, err_fd) end
  assert(os.execute(redir .. "; (" .. cmd .. ") &"), "could not start: " .. cmd)
end

-- A ring capturing cmd's stdout (and stderr, when with_stderr).
local function capture(cmd, opts, with_stderr)
  local ring = lb.ring(opts or {})
  local r, w = assert(lb.pipe())
  local r2, w2
  if with_stderr then r2, w2 = assert(lb.pipe()) end
  start(cmd, w, w2)
  assert(lb.close_fd(w))
  assert(ring:capture(r, "stdout"))
  if w2 then
    assert(lb.close_fd(w2))
    assert(ring:capture(r2, "stderr"))
  end
  return ring
end

-- A pipe whose write end Lua holds as a file, captured by ring.
local function writer(ring, stream, source)
  local r, w = assert(lb.pipe())
  local f = assert(io.open(("/proc/%s/fd/%d"):format(PID, w), "w"))
  assert(lb.close_fd(w))
  f:setvbuf("no")
  assert(ring:capture(r, stream or "stdout", source))
  return f
end

-- Rings a, b and c feeding sink, a writer into each, and say(name, text):
-- a line written into one, returned once its ring holds it.
local function three_rings(sink)
  local rings, writers, n = {}, {}, {}
  for _, name in ipairs { "a", "b", "c" } do
    rings[name] = lb.ring{ tag = name, sink = sink }
    writers[name], n[name] = writer(rings[name]), 0
  end
  local function say(name, text)
    writers[name]:write(text, "\n")
    assert(rings[name]:wait(n[name], 5000))
    n[name] = n[name] + 1
  end
  return rings, writers, say
end

local function texts(ring, ...)
  local t = {}
  for i, l in ipairs(ring:lines(...)) do t[i] = l.text end
  return t
end

local function drained(ring)
  assert.is_true(ring:wait_drained(10000))
  assert.are.equal(0, ring:open_fds())
end

describe("core.logbuf", function()
  local fds_before
  setup(function()
    -- libuv opens one reserve fd per loop (for EMFILE) with its first
    -- stream: open one before counting
    core.run(function()
      local ring = lb.ring()
      local r, w = assert(lb.pipe())
      assert(ring:capture(r))
      lb.close_fd(w)
      assert(ring:wait_drained(5000))
      ring:close()
      core.sleep(1)
    end)
    collectgarbage()
    fds_before = fd_count()

  end)

  teardown(function()
    -- every fd of every test is closed: read ends at EOF or close, write
    -- ends by close_fd, Lua writers by their close
    core.run(function() core.sleep(5) end) -- let pending close callbacks run
    collectgarbage()
    collectgarbage()
    core.run(function() core.sleep(5) end)

    assert.are.equal(fds_before, fd_count())
  end)

  describe("pipe", function()
    it("returns two close-on-exec fds, and close_fd closes them once", function()
      local r, w = lb.pipe()
      assert.is_true(math.type(r) == "integer" and math.type(w) == "integer")
      for _, fd in ipairs({ r, w }) do
        local info = assert(fs.read(("/proc/self/fdinfo/%d"):format(fd)))
        local flags = tonumber(info:match("flags:%s*(%d+)"), 8)
        assert.are_not.equal(0, flags & tonumber("2000000", 8)) -- O_CLOEXEC
      end
      assert.is_true(lb.close_fd(r))
      assert.is_true(lb.close_fd(w))
      local ok, err, code = lb.close_fd(w)
      assert.is_nil(ok)
      assert.matches("close fd", err)
      assert.are.equal("EBADF", code)
      assert.has_error(function() lb.close_fd(-1) end)
    end)
  end)

  describe("line splitting", function()
    it("marks each line with the source its capture was given (0 without one)", function()
      core.run(function()
        local ring = lb.ring()
        local a = writer(ring)
        local r, w = assert(lb.pipe())
        local f = assert(io.open(("/proc/%s/fd/%d"):format(PID, w), "w"))
        assert(lb.close_fd(w))
        f:setvbuf("no")
        assert(ring:capture(r, "stderr", 4194304))
        a:write("old\n")
        f:write("new\n")
        a:close()
        f:close()
        drained(ring)
        local by = {}
        for _, l in ipairs(ring:lines()) do by[l.text] = l.source .. " " .. l.stream end
        assert.are.same({ old = "0 stdout", new = "4194304 stderr" }, by)
        local r2, w2 = assert(lb.pipe())
        assert(lb.close_fd(w2))
        assert.has_error(function() ring:capture(r2, "stdout", -1) end)
        lb.close_fd(r2)
        ring:close()
      end)
    end)

    it("joins a line split across reads", function()
      core.run(function()
        local ring = capture([[printf ab; sleep 0.05; printf 'c\nd\n']])
        drained(ring)
        assert.are.same({ "abc", "d" }, texts(ring))
        ring:close()
      end)
    end)

    -- a line's time is when it began: an app that writes half a line and
    -- the rest (or nothing more, until it exits) later did what it logs then
    it("gives a line written in pieces the time of its first piece", function()
      core.run(function()
        local ring = lb.ring{}
        local f = writer(ring)
        local t0 = core.time()
        f:write("begun")
        core.sleep(1000)
        f:write(" and ended\nlast, without a newline")
        core.sleep(1000)
        f:close()
        drained(ring)
        local ls = ring:lines()
        assert.are.same({ "begun and ended", "last, without a newline" }, { ls[1].text, ls[2].text })
        -- half a second either way: a second apart, the pieces are told apart
        assert.is_true(ls[1].ts < t0 + 0.5, "stamped " .. (ls[1].ts - t0) .. " s after its first byte")
        assert.is_true(ls[2].ts > t0 + 0.9 and ls[2].ts < t0 + 1.5, "stamped " .. (ls[2].ts - t0) .. " s after t0")
        ring:close()
      end)
    end)

    it("joins pieces written at different times, byte by byte", function()
      core.run(function()
        local ring = lb.ring{}
        local f = writer(ring)
        for _, piece in ipairs({ "he", "llo\r", "\n", "w", "orld\n" }) do
          f:write(piece)
          core.sleep(5)
        end
        f:close()
        drained(ring)
        assert.are.same({ "hello", "world" }, texts(ring))
        ring:close()
      end)
    end)

    it("ends lines on \\n and \\r\\n, keeps empty lines and a lone \\r", function()
      core.run(function()
        local ring = capture([[printf 'a\r\n\r\n\nb\r\nc\rd\n\n']])
        drained(ring)
        assert.are.same({ "a", "", "", "b", "c\rd", "" }, texts(ring))
        ring:close()
      end)
    end)

    it("cuts a 100 KiB line at max_line with a marker and keeps the next line", function()
      core.run(function()
        local ring = capture([[head -c 102400 /dev/zero | tr '\0' x; printf '\nnext\n']])
        drained(ring)
        local t = texts(ring)
        assert.are.equal(2, #t)
        assert.are.equal(string.rep("x", 16384) .. MARK, t[1])
        assert.are.equal("next", t[2])
        local st = ring:stats()
        assert.are.equal(1, st.truncated)
        assert.are.equal(2, st.lines)
        ring:close()
      end)
    end)

    it("cuts exactly past max_line, not at it, and not inside a UTF-8 character", function()
      core.run(function()
        local ring = capture([[printf '12345678\n12345678\r\n123456789\nabc\303\251\n1234567\r\n']],
                             { max_line = 8 })
        drained(ring)
        assert.are.same({ "12345678", "12345678", "12345678" .. MARK, "abc\xc3\xa9",
                          "1234567" }, texts(ring))
        ring:close()
        ring = capture([[printf 'abcd\303\251\n']], { max_line = 5 })
        drained(ring)
        assert.are.same({ "abcd" .. MARK }, texts(ring))
        ring:close()
      end)
    end)

    it("keeps a \\r at max_line + 1 until it sees whether \\n follows", function()
      core.run(function()
        local ring = lb.ring{ max_line = 4 }
        local f = writer(ring)
        f:write("1234\r"); core.sleep(20)
        f:write("\n5678\r"); core.sleep(20)
        f:write("9\nend\n")
        f:close()
        drained(ring)
        assert.are.same({ "1234", "5678" .. MARK, "end" }, texts(ring))
        assert.are.equal(1, ring:stats().truncated)
        ring:close()
      end)
    end)

    it("cuts a line that never ends as soon as it is too long", function()
      core.run(function()
        local ring = lb.ring{ max_line = 10 }
        local f = writer(ring)
        f:write(string.rep("y", 25))
        assert.is_true(ring:wait(0, 5000))
        assert.are.same({ string.rep("y", 10) .. MARK }, texts(ring))
        f:write(string.rep("y", 25) .. "\nafter\n")
        f:close()
        drained(ring)
        assert.are.same({ string.rep("y", 10) .. MARK, "after" }, texts(ring))
        ring:close()
      end)
    end)

    it("keeps NUL bytes and invalid UTF-8 as they are", function()
      core.run(function()
        local ring = capture([[printf 'a\000b\n\000\n\377\376x\n']])
        drained(ring)
        assert.are.same({ "a\0b", "\0", "\xff\xfex" }, texts(ring))
        ring:close()
      end)
    end)

    it("flushes a partial last line at EOF", function()
      core.run(function()
        local ring = capture([[printf 'one\ntwo']])
        drained(ring)
        assert.are.same({ "one", "two" }, texts(ring))
        ring:close()
      end)
    end)

    it("records stdout and stderr in one ring with their stream", function()
      core.run(function()
        local ring = capture([[echo out; sleep 0.1; echo err >&2; sleep 0.1; echo out2]], nil, true)
        assert.are.equal(2, ring:open_fds())
        drained(ring)
        local got = {}
        for _, l in ipairs(ring:lines()) do got[#got + 1] = l.stream .. ":" .. l.text end
        assert.are.same({ "stdout:out", "stderr:err", "stdout:out2" }, got)
        ring:close()
      end)
    end)
  end)

  describe("ring", function()
    it("keeps the newest N lines with consecutive seqs and a wall-clock ts", function()
      core.run(function()
        local t0 = core.time()
        local ring = capture([[printf '1\n2\n3\n4\n5\n']], { lines = 3, tag = "api:prod" })
        drained(ring)
        local t1 = core.time()
        local ls = ring:lines()
        assert.are.same({ "3", "4", "5" }, { ls[1].text, ls[2].text, ls[3].text })
        assert.are.same({ 3, 4, 5 }, { ls[1].seq, ls[2].seq, ls[3].seq })
        for _, l in ipairs(ls) do
          assert.are.equal("stdout", l.stream)
          assert.is_true(l.ts >= t0 - 0.002 and l.ts <= t1 + 0.002)
          assert.is_true(math.abs(l.ts * 1000 - math.floor(l.ts * 1000 + 0.5)) < 1e-3)
        end
        assert.are.equal(5, ring:last_seq())
        local st = ring:stats()
        assert.are.same({ lines = 5, bytes = 5, truncated = 0, overwritten = 2, held = 3,
                          held_bytes = 3, dropped = 0, waiting = 0 }, st)
        ring:close()
      end)
    end)

    it("caps the bytes it holds, always keeping the newest line", function()
      core.run(function()
        local ring = capture([[printf 'aaaa\nbbbb\ncccc\ndddddddddddd\n']], { lines = 100, bytes = 10 })
        drained(ring)
        assert.are.same({ "dddddddddddd" }, texts(ring))
        ring:close()
        ring = capture([[printf 'aaaa\nbbbb\ncccc\n']], { lines = 100, bytes = 10 })
        drained(ring)
        assert.are.same({ "bbbb", "cccc" }, texts(ring))
        assert.are.equal(8, ring:stats().held_bytes)
        ring:close()
      end)
    end)

    -- The slots grow as lines come (a quiet instance holds none); the byte
    -- cap evicts while there is room, so the ring is often wrapped when it
    -- grows. A model in Lua says what must be held after every line.
    it("keeps the newest lines in order while it grows, wrapped or not", function()
      core.run(function()
        local max_lines, max_bytes = 100, 600
        local ring = lb.ring { lines = max_lines, bytes = max_bytes }
        local out = writer(ring)
        local model, held_bytes = {}, 0
        math.randomseed(3)
        for i = 1, 400 do
          -- long lines first (few held, the ring wraps), then short ones
          -- (more held: it grows while wrapped), then a mix
          local pad = i <= 100 and math.random(30, 60) or i <= 250 and math.random(0, 2) or math.random(0, 40)
          local text = string.format("%d:", i) .. string.rep("x", pad)
          model[#model + 1] = text
          held_bytes = held_bytes + #text
          while #model > max_lines or (#model > 1 and held_bytes > max_bytes) do
            held_bytes = held_bytes - #table.remove(model, 1)
          end
          out:write(text, "\n")
          assert(ring:wait(i - 1, 5000))
          assert.are.same(model, texts(ring))
        end
        -- the same with the line cap the limit: 400 short lines into 100 slots
        local ring2 = lb.ring { lines = max_lines }
        local out2 = writer(ring2)
        local want = {}
        for i = 1, 400 do
          out2:write(i, "\n")
          assert(ring2:wait(i - 1, 5000))
          if i > 300 then want[#want + 1] = tostring(i) end
        end
        assert.are.same(want, texts(ring2))
        assert.are.equal(300, ring2:stats().overwritten)
        out:close(); out2:close()
        ring:close(); ring2:close()
      end)
    end)

    it("lines(after_seq, max) returns what is held after a seq, the newest max", function()
      core.run(function()
        local ring = capture([[printf '1\n2\n3\n4\n5\n6\n7\n']], { lines = 5 })
        drained(ring)
        assert.are.same({ "3", "4", "5", "6", "7" }, texts(ring))
        assert.are.same({ "3", "4", "5", "6", "7" }, texts(ring, 1))
        assert.are.same({ "5", "6", "7" }, texts(ring, 4))
        assert.are.same({}, texts(ring, 7))
        assert.are.same({}, texts(ring, 100))
        assert.are.same({ "6", "7" }, texts(ring, nil, 2))
        assert.are.same({ "6", "7" }, texts(ring, 3, 2))
        assert.are.same({ "5", "6", "7" }, texts(ring, 4, 10))
        assert.are.same({}, texts(ring, 0, 0))
        assert.are.equal(6, ring:lines(5)[1].seq)
        ring:close()
      end)
    end)

    it("an empty ring has last_seq 0 and no lines", function()
      local ring = lb.ring()
      assert.are.equal(0, ring:last_seq())
      assert.are.same({}, ring:lines())
      assert.are.equal(0, ring:open_fds())
      ring:close()
    end)

    it("wait returns at once when a newer line exists, wakes on a new one, times out", function()
      core.run(function()
        local ring = lb.ring{}
        local f = writer(ring)
        local ok, err = ring:wait(0, 0)
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        ok, err = ring:wait(-1, 0)
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        ok, err = ring:wait(0, 30)
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        local waiter = core.spawn(function() return ring:wait(0, 5000) end)
        core.sleep(10)
        assert.are.equal("waiting", waiter:status())
        f:write("late\n")
        assert.are.same({ true, true }, { waiter:join() })
        assert.are.same({ "late" }, texts(ring, 0))
        assert.is_true(ring:wait(0))              -- seq 1 > 0: at once
        ok, err = ring:wait(nil, 20)              -- default: newer than the last
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        f:close()
        drained(ring)
        ring:close()
      end)
    end)

    it("wakes every task waiting on one ring, even when one of them fails", function()
      local errors = {}
      core.on_error(function(trace) errors[#errors + 1] = trace end)
      core.run(function()
        local ring = capture([[sleep 0.05; echo hello]])
        local woke = {}
        local tasks = {}
        for i = 1, 3 do
          tasks[i] = core.spawn(function()
            assert(ring:wait(0, 5000))
            woke[#woke + 1] = i
            if i == 1 then error("task 1 fails after waking") end
            return ring:lines(0)[1].text
          end)
        end
        drained(ring)
        local ok, err = tasks[1]:join()
        assert.is_nil(ok)
        assert.matches("task 1 fails", tostring(err))
        assert.are.same({ true, "hello" }, { tasks[2]:join() })
        assert.are.same({ true, "hello" }, { tasks[3]:join() })
        table.sort(woke)
        assert.are.same({ 1, 2, 3 }, woke)
        ring:close()
      end)
      core.on_error(nil)
    end)

    it("wait_drained waits for EOF on every fd, and times out while one is open", function()
      core.run(function()
        local ring = lb.ring{}
        local f = writer(ring)
        local ok, err = ring:wait_drained(20)
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        assert.are.equal(1, ring:open_fds())
        f:write("last words")
        f:close()
        assert.is_true(ring:wait_drained(5000))
        assert.are.same({ "last words" }, texts(ring))
        ring:close()
      end)
    end)

    it("close stops reading, wakes waiters with closed, and is idempotent", function()
      core.run(function()
        local ring = lb.ring{}
        local f = writer(ring)
        local order = {}
        local w1 = core.spawn(function()
          local r = table.pack(ring:wait(0))
          order[#order + 1] = "waiter"
          return table.unpack(r, 1, r.n)
        end)
        local w2 = core.spawn(function() return ring:wait_drained() end)
        core.sleep(5)
        ring:close()
        -- the waiters are woken, not run inside the close
        order[#order + 1] = "closer"
        assert.are.same({ true, nil, "closed" }, { w1:join() })
        assert.are.same({ "closer", "waiter" }, order)
        assert.are.same({ true, nil, "closed" }, { w2:join() })
        ring:close()
        assert.has_error(function() ring:lines() end, "logbuf ring is closed")
        assert.has_error(function() ring:wait(0) end, "logbuf ring is closed")
        assert.has_error(function() ring:capture(0) end, "logbuf ring is closed")
        assert.matches("closed", tostring(ring))
        -- the read end is closed: the writer gets EPIPE, not a hang
        local ok = f:write("x\n")
        ok = ok and f:flush()
        assert.is_falsy(ok)
        f:close()
      end)
    end)

    it("a task waiting on a ring keeps it alive when nothing else refers to it", function()
      core.run(function()
        local waiter = core.spawn(function() return lb.ring{}:wait(0, 50) end)
        core.sleep(1)
        for _ = 1, 5 do
          collectgarbage()
          core.sleep(5)
        end
        assert.are.same({ true, nil, "timeout" }, { waiter:join() })
        local taker = core.spawn(function() return lb.sink{}:take(1, 50) end)
        core.sleep(1)
        collectgarbage()
        assert.are.same({ true, nil, "timeout" }, { taker:join() })
      end)
    end)

    it("a <close> variable closes the ring", function()
      local seen
      do
        local ring <close> = lb.ring{}
        seen = ring
      end
      assert.matches("closed", tostring(seen))
    end)

    it("keeps reading and feeding its sink after the last Lua reference is dropped", function()
      core.run(function()
        local sink = lb.sink{}
        do
          local ring = lb.ring{ sink = sink }
          local r, w = assert(lb.pipe())
          start([[sleep 0.1; echo orphan]], w)
          lb.close_fd(w)
          assert(ring:capture(r))
        end
        collectgarbage()
        collectgarbage()
        local batch = assert(sink:take(10, 5000))
        assert.are.equal("orphan", batch[1][4])
        sink:close()
      end)
    end)

    it("rejects bad fds and bad options", function()
      core.run(function()
        local ring = lb.ring{}
        local ok, err, code = ring:capture(1000000)
        assert.is_nil(ok)
        assert.matches("capture fd 1000000", err)
        assert.are.equal("EBADF", code)

        -- a regular file: refused (epoll cannot watch it) and closed
        local path = (os.getenv("TMPDIR") or "/tmp") .. ("/logbuf-spec-%s-%d"):format(PID, math.random(1e9))
        local fh = assert(io.open(path, "w"))
        local real = assert(fs.realpath(path))
        local fd
        for _, name in ipairs(fs.readdir("/proc/self/fd")) do
          if fs.realpath("/proc/self/fd/" .. name) == real then fd = tonumber(name) end
        end
        assert.is_not_nil(fd)
        ok, err, code = ring:capture(fd)
        assert.is_nil(ok)
        assert.matches("not a pipe or a socket", err)
        assert.are.equal("EINVAL", code)
        assert.is_nil(fs.realpath("/proc/self/fd/" .. fd)) -- ownership taken: closed
        pcall(fh.close, fh)
        os.remove(path)

        -- an fd the loop already watches is refused and left open
        local r, w = assert(lb.pipe())
        assert(ring:capture(r))
        ok, err, code = ring:capture(r)
        assert.is_nil(ok)
        assert.are.equal("EEXIST", code)
        lb.close_fd(w)
        drained(ring)

        assert.has_error(function() ring:capture(r, "stdin") end)
        assert.has_error(function() ring:capture("x") end)
        ring:close()
      end)
      assert.has_error(function() lb.ring{ lines = 0 } end, "logbuf.ring: option 'lines' must be between 1 and 1000000")
      assert.has_error(function() lb.ring{ tag = 1 } end, "logbuf.ring: option 'tag' must be a string")
      assert.has_error(function() lb.ring{ sink = {} } end, "logbuf.ring: option 'sink' must be a logbuf sink")
      assert.has_error(function() lb.ring{ line = 5 } end, "logbuf.ring: unknown option 'line'")
      assert.has_error(function() lb.ring{ max_line = 1.5 } end, "logbuf.ring: option 'max_line' must be an integer")
      assert.has_error(function() lb.sink{ max_pending = 0 } end)
      assert.has_error(function() lb.sink{ pending = 1 } end, "logbuf.sink: unknown option 'pending'")
      local sink = lb.sink{}
      sink:close()
      assert.has_error(function() lb.ring{ sink = sink } end, "logbuf sink is closed")
    end)

    it("waiting outside a task raises", function()
      local ring = lb.ring{}
      assert.has_error(function() ring:wait(0) end)
      assert.is_true(ring:wait_drained()) -- nothing open: no need to wait
      local r, w = assert(lb.pipe())
      assert(ring:capture(r))
      assert.has_error(function() ring:wait_drained() end)
      ring:close()
      lb.close_fd(w)
    end)
  end)

  describe("sink", function()
    it("batches lines of several rings in arrival order with tags and streams", function()
      core.run(function()
        local sink = lb.sink{}
        local a = lb.ring{ tag = "api:prod", sink = sink }
        local b = lb.ring{ tag = "web:1", sink = sink }
        -- a's with the source its captures were given (the pid, in ten), b's without
        local a_out, a_err, b_out = writer(a, "stdout", 77), writer(a, "stderr", 78), writer(b, "stdout")
        local t0 = core.time()
        a_out:write("a1\n"); assert(a:wait(0, 5000))
        b_out:write("b1\n"); assert(b:wait(0, 5000))
        a_err:write("a2\n"); assert(a:wait(1, 5000))
        b_out:write("b2\n"); assert(b:wait(1, 5000))
        local batch = assert(sink:take(100))
        assert.are.equal(4, #batch)
        local got = {}
        for i, row in ipairs(batch) do
          assert.is_true(row[1] >= t0 - 0.002 and row[1] <= core.time() + 0.002)
          got[i] = { row[2], row[3], row[4], row[5] }
        end
        assert.are.same({
          { "api:prod", "stdout", "a1", 77 }, { "web:1", "stdout", "b1" },
          { "api:prod", "stderr", "a2", 78 }, { "web:1", "stdout", "b2" },
        }, got)
        assert.are.same({ pending = 0, bytes = 0, taken = 4, dropped = 0 }, sink:stats())
        for _, f in ipairs({ a_out, a_err, b_out }) do f:close() end
        drained(a); drained(b)
        a:close(); b:close(); sink:close()
      end)
    end)

    it("take waits for a line, limits the batch to max_lines, and times out", function()
      core.run(function()
        local sink = lb.sink{}
        local ok, err = sink:take(10, 20)
        assert.is_nil(ok)
        assert.are.equal("timeout", err)
        local ring = capture([[sleep 0.05; printf '1\n2\n3\n4\n5\n']], { sink = sink })
        local first = assert(sink:take(2, 5000))  -- yields until the lines come
        drained(ring)
        local rest = {}
        while sink:stats().pending > 0 do
          for _, row in ipairs(assert(sink:take(2))) do rest[#rest + 1] = row[4] end
        end
        local all = {}
        for _, row in ipairs(first) do all[#all + 1] = row[4] end
        for _, t in ipairs(rest) do all[#all + 1] = t end
        assert.is_true(#first >= 1 and #first <= 2)
        assert.are.same({ "1", "2", "3", "4", "5" }, all)
        assert.are.equal(5, sink:stats().taken)
        assert.has_error(function() sink:take(0) end)
        ring:close(); sink:close()
      end)
    end)

    it("drops the oldest pending lines past max_pending, counts them and marks the gap", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 3 }
        local ring = capture([[seq 1 10]], { sink = sink, tag = "api:a" })
        drained(ring)
        assert.are.same({ pending = 3, bytes = 4, taken = 0, dropped = 7 }, sink:stats())
        assert.are.equal(7, ring:stats().dropped)
        local batch = sink:take(100)
        -- the gap's row has the time, tag and stream of the line after it
        assert.are.same({ "api:a", "stdout", "\u{2026}[7 lines dropped here: the log store could not keep up]" },
          { batch[1][2], batch[1][3], batch[1][4] })
        assert.are.equal(batch[2][1], batch[1][1])
        assert.are.same({ "8", "9", "10" }, { batch[2][4], batch[3][4], batch[4][4] })
        assert.are.equal(4, #batch)
        assert.are.same({ pending = 0, bytes = 0, taken = 3, dropped = 7 }, sink:stats())
        ring:close(); sink:close()
      end)
    end)

    -- One app flooding its output must not cost a quiet one its lines: the
    -- store falls behind the flood, and the flood pays for it.
    it("drops the lines of the ring with the most waiting, not a quiet neighbour's", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 100 }
        local quiet = lb.ring{ tag = "app:quiet", sink = sink }
        local q = writer(quiet)
        q:write("q1\n")
        assert(quiet:wait(0, 5000))
        local flood = capture(FLOOD .. " 5000 20", { tag = "app:flood", sink = sink })
        drained(flood)
        q:write("q2\n")
        assert(quiet:wait(1, 5000))
        -- 99 of the flood's lines fitted beside q1; each line after them,
        -- and q2, cost the flood its oldest
        assert.are.same({ 0, 4902 }, { quiet:stats().dropped, flood:stats().dropped })
        assert.are.same({ pending = 100, bytes = 98 * 19 + 4, taken = 0, dropped = 4902 }, sink:stats())
        local batch = assert(sink:take(1000))
        assert.are.equal(101, #batch)
        assert.are.same({ "app:quiet", "q1" }, { batch[1][2], batch[1][4] })
        assert.are.same({ "app:flood", "\u{2026}[4902 lines dropped here: the log store could not keep up]" },
          { batch[2][2], batch[2][4] })
        for i = 3, 100 do
          assert.are.equal(string.format("%010d", 4902 + i - 3), batch[i][4]:sub(1, 10))
        end
        assert.are.same({ "app:quiet", "q2" }, { batch[101][2], batch[101][4] })
        q:close()
        drained(quiet)
        flood:close(); quiet:close(); sink:close()
      end)
    end)

    it("hands out the lines of several rings in arrival order around what it dropped", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 4 }
        local rings, writers, say = three_rings(sink)
        local function take()
          local got = {}
          for i, row in ipairs(assert(sink:take(100))) do got[i] = row[2] .. " " .. row[4] end
          return got
        end
        -- full at a1 b1 c1 a2: a3 and a4 each cost a, the ring with the most waiting
        for _, w in ipairs { "a1", "b1", "c1", "a2", "a3", "a4" } do say(w:sub(1, 1), w) end
        assert.are.same({ "b b1", "c c1", "a \u{2026}[2 lines dropped here: the log store could not keep up]",
          "a a3", "a a4" }, take())
        -- a gap is told once
        say("b", "b2"); say("a", "a5")
        assert.are.same({ "b b2", "a a5" }, take())
        say("c", "c2"); say("a", "a6"); say("b", "b3")
        assert.are.same({ "c c2", "a a6", "b b3" }, take())
        assert.are.same({ pending = 0, bytes = 0, taken = 9, dropped = 2 }, sink:stats())
        for name, f in pairs(writers) do f:close(); drained(rings[name]); rings[name]:close() end
        sink:close()
      end)
    end)

    -- A reader of one instance has the store take that instance's lines now,
    -- not every line a flood beside it left waiting.
    it("hands out one ring's waiting lines on their own, and the rest still in arrival order", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 6 }
        local rings, writers, say = three_rings(sink)
        local function rows(batch)
          local got = {}
          for i, row in ipairs(batch) do got[i] = row[2] .. " " .. row[4] end
          return got
        end
        -- full at a1 b1 a2 c1 b2 a3: a4 costs a its oldest
        for _, w in ipairs { "a1", "b1", "a2", "c1", "b2", "a3", "a4" } do say(w:sub(1, 1), w) end
        assert.are.same({ 3, 2, 1 }, { rings.a:stats().waiting, rings.b:stats().waiting, rings.c:stats().waiting })
        assert.are.same({ "b b1", "b b2" }, rows(rings.b:take_waiting(10)))
        assert.are.same({}, rows(rings.b:take_waiting(10)))
        assert.are.same({ "a \u{2026}[1 line dropped here: the log store could not keep up]", "a a2" },
          rows(rings.a:take_waiting(1)))
        assert.are.same({ pending = 3, bytes = 6, taken = 3, dropped = 1 }, sink:stats())
        -- b's key in the order of all is stale now: its next line still comes last
        say("b", "b3"); say("c", "c2")
        assert.are.same({ "c c1", "a a3", "a a4", "b b3", "c c2" }, rows(assert(sink:take(100))))
        assert.are.same({ pending = 0, bytes = 0, taken = 8, dropped = 1 }, sink:stats())
        assert.has_error(function() rings.c:take_waiting(0) end)
        -- a ring with no sink has none waiting
        local alone = lb.ring{}
        assert.are.same({}, alone:take_waiting())
        assert.are.equal(0, alone:stats().waiting)
        alone:close()
        for name, f in pairs(writers) do f:close(); drained(rings[name]); rings[name]:close() end
        sink:close()
      end)
    end)

    it("drops the oldest pending lines past max_bytes", function()
      core.run(function()
        local sink = lb.sink{ max_bytes = 10 }
        local ring = capture([[printf 'aaaa\nbbbb\ncccc\n']], { sink = sink })
        drained(ring)
        assert.are.same({ pending = 2, bytes = 8, taken = 0, dropped = 1 }, sink:stats())
        ring:close(); sink:close()
      end)
    end)

    it("close wakes takers with closed; a closed sink raises, a ring feeding it goes on", function()
      core.run(function()
        local sink = lb.sink{}
        local ring = lb.ring{ sink = sink }
        local f = writer(ring)
        local order = {}
        local t1 = core.spawn(function()
          local r = table.pack(sink:take(10))
          order[#order + 1] = "taker"
          return table.unpack(r, 1, r.n)
        end)
        local t2 = core.spawn(function() return sink:take(10, 5000) end)
        core.sleep(5)
        sink:close()
        order[#order + 1] = "closer"
        sink:close()
        assert.are.same({ true, nil, "closed" }, { t1:join() })
        assert.are.same({ "closer", "taker" }, order)
        assert.are.same({ true, nil, "closed" }, { t2:join() })
        assert.has_error(function() sink:take(1) end, "logbuf sink is closed")
        assert.has_error(function() sink:stats() end, "logbuf sink is closed")
        f:write("still captured\n")
        f:close()
        drained(ring)
        assert.are.same({ "still captured" }, texts(ring))
        ring:close()
      end)
    end)
  end)

  describe("flood", function()
    it("counts all of 200k lines without Lua per line, and the child never waits on Lua", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 1000 }
        local ring = capture(FLOOD .. " 200000 100", { lines = 1000, sink = sink })
        -- nobody takes from the sink or reads the ring meanwhile: the child
        -- still runs to its end
        assert.is_true(ring:wait_drained(15000))
        local st = ring:stats()
        assert.are.equal(200000, st.lines)
        assert.are.equal(200000 * 99, st.bytes)
        assert.are.equal(1000, st.held)
        assert.are.equal(199000, st.overwritten)
        local ls = ring:lines()
        assert.are.equal(199001, ls[1].seq)
        assert.are.equal("0000199000 ", ls[1].text:sub(1, 11))
        assert.are.equal("0000199999 ", ls[#ls].text:sub(1, 11))
        assert.are.same({ pending = 1000, bytes = 99000, taken = 0, dropped = 199000 }, sink:stats())
        local batch = sink:take(5000)
        assert.are.equal(1001, #batch)
        assert.are.equal("\u{2026}[199000 lines dropped here: the log store could not keep up]", batch[1][4])
        assert.are.equal("0000199000 ", batch[2][4]:sub(1, 11))
        ring:close(); sink:close()
      end)
    end)

    it("a taker keeping up gets every line of a flood in order", function()
      core.run(function()
        local sink = lb.sink{ max_pending = 1000000 }
        local ring = capture(FLOOD .. " 200000 100", { sink = sink })
        local n, batches, in_order = 0, 0, true
        while n < 200000 do
          local batch = assert(sink:take(10000, 10000))
          batches = batches + 1
          for _, row in ipairs(batch) do
            if tonumber(row[4]:sub(1, 10)) ~= n then in_order = false end
            n = n + 1
          end
        end
        assert.is_true(in_order)
        assert.is_true(batches < 200000 / 10) -- batches, not lines one by one
        drained(ring)
        assert.are.same({ pending = 0, bytes = 0, taken = 200000, dropped = 0 }, sink:stats())
        ring:close(); sink:close()
      end)
    end)
  end)
end)
