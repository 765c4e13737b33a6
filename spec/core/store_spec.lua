-- The store: real SQLite files, the schema's migrations, and log search at scale.
local core = require "tenement.core"
local store = require "tenement.store"
local support = require "support"

describe("store", function()
  local dir
  before_each(function() dir = support.tmpdir() end)
  after_each(support.cleanup)

  it("migrates a new file to the latest schema, once", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local rows = st.conn:query("PRAGMA user_version")
      assert.are.equal(#store.migrations, rows[1].user_version)
      st:close()
      st = assert(store.open(dir .. "/t.db"))
      assert.are.equal(#store.migrations, st.conn:query("PRAGMA user_version")[1].user_version)
      st:close()
    end)
  end)

  it("refuses a store written by a newer ten, saying what to do", function()
    core.run(function()
      local conn = assert(core.db.open(dir .. "/n.db"))
      conn:exec("PRAGMA user_version = 999")
      conn:close()
      local st, err = store.open(dir .. "/n.db")
      assert.is_nil(st)
      assert.matches("newer ten", err, 1, true)
    end)
  end)

  it("remembers desired instances and weights", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      assert(st:set_desired("api", "a", true))
      assert(st:set_desired("api", "b", true))
      assert(st:set_desired("api", "b", false))
      assert(st:set_weight("api", "a", 30))
      local rows = st:instances()
      assert.are.equal(2, #rows)
      local by = {}
      for _, r in ipairs(rows) do by[r.id] = r end
      assert.is_true(by.a.desired)
      assert.are.equal(30, by.a.weight)
      assert.is_false(by.b.desired)
      assert(st:forget("api", "b"))
      assert.are.equal(1, #st:instances())
      st:close()
    end)
  end)

  -- Each commit appends its pages to the WAL: 200 writes one by one would
  -- leave hundreds of frames there, committed together a handful.
  it("commits desired states written at once together, in the order they came", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local wal0 = core.fs.stat(dir .. "/t.db-wal").size
      local tasks = {}
      for i = 1, 200 do
        tasks[i] = core.spawn(function() return st:set_desired("api", "i" .. i, true) end)
      end
      -- the same row set twice: the later write wins
      tasks[201] = core.spawn(function() return st:set_desired("api", "i1", false) end)
      for _, t in ipairs(tasks) do
        local ok, res = t:join()
        assert.is_true(ok)
        assert.is_true(res)
      end
      local rows = st:instances()
      assert.are.equal(200, #rows)
      for _, r in ipairs(rows) do assert.are.equal(r.id ~= "i1", r.desired) end
      local frames = (core.fs.stat(dir .. "/t.db-wal").size - wal0) / (24 + 4096)
      assert.is_true(frames < 20, frames .. " WAL frames")
      st:close()
    end)
    -- outside a task the write is made at once
    local st = assert(store.open(dir .. "/t.db"))
    assert.is_true(st:set_desired("api", "late", true))
    assert.are.equal(201, #st:instances())
    st:close()
  end)

  it("writes a list of desired states in one transaction", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local list = {}
      for i = 1, 500 do list[i] = { service = "api", id = "n" .. i } end
      local wal0 = core.fs.stat(dir .. "/t.db-wal").size
      assert.is_true(st:set_desired_all(list, true))
      local frames = (core.fs.stat(dir .. "/t.db-wal").size - wal0) / (24 + 4096)
      assert.is_true(frames < 20, frames .. " WAL frames")
      local rows = st:instances()
      assert.are.equal(500, #rows)
      for _, r in ipairs(rows) do assert.is_true(r.desired) end
      assert.is_true(st:set_desired_all({ list[1], list[2] }, false))
      local off = 0
      for _, r in ipairs(st:instances()) do if not r.desired then off = off + 1 end end
      assert.are.equal(2, off)
      st:close()
    end)
  end)

  it("keeps tokens as hashes only, found by their prefix", function()
    local auth = require "tenement.auth"
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local token, prefix, hash = auth.new_token()
      assert.are.equal(43, #token)
      assert(st:token_create("ci", prefix, hash, nil, "for CI"))
      local _, err, code = st:token_create("ci", "other123", hash)
      assert.are.equal("conflict", code)
      assert.matches("exists already", err, 1, true)
      local p = auth.verify(st, token)
      assert.is_true(p.admin)
      assert.are.equal("ci", p.name)
      assert.is_nil(auth.verify(st, token:sub(1, 42) .. (token:sub(43) == "A" and "B" or "A")))
      -- nothing of the token itself is stored
      local raw = st.conn:query("SELECT * FROM tokens")
      for _, row in ipairs(raw) do
        for _, v in pairs(row) do assert.is_nil(tostring(v):find(token, 1, true)) end
      end
      assert(st:token_revoke("ci"))
      assert.is_nil(auth.verify(st, token))
      local ok, rerr, rcode = st:token_revoke("ci")
      assert.is_nil(ok)
      assert.are.equal("not_found", rcode)
      assert.matches("no token named ci (a revoked one is gone; `ten token-list` shows those there are)", rerr, 1, true)
      st:close()
    end)
  end)

  it("searches 300,000 log lines: right lines, newest first, highlighted, filtered", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local t0 = core.time() - 1000
      local batch = {}
      for i = 1, 300000 do
        local instance = (i % 3 == 0) and "api:a" or "api:b"
        local msg = string.format("request %d path /p%d took %d ms", i, i % 100, i % 7)
        if i % 10000 == 0 then msg = "ERROR database unreachable after " .. i .. " tries" end
        batch[#batch + 1] = { t0 + i / 1000, instance, (i % 2 == 0) and "stderr" or "stdout", msg }
        if #batch == 10000 then
          assert(st:append_logs(batch))
          batch = {}
        end
      end
      local rows = assert(st:logs { q = "database unreachable", limit = 100 })
      assert.are.equal(30, #rows)
      for i = 2, #rows do assert.is_true(rows[i - 1].seq > rows[i].seq) end
      assert.matches("after 300000 tries", rows[1].message, 1, true)
      assert.matches("[database] [unreachable]", rows[1].highlighted, 1, true)
      -- the last word matches as a prefix
      assert.are.equal(30, #assert(st:logs { q = "unreach", limit = 100 }))
      -- filters combine: instance, stream, time, limit
      rows = assert(st:logs { q = "database", instance = "api:a", limit = 100 })
      assert.are.equal(10, #rows) -- i % 10000 == 0 and i % 3 == 0: every 30000
      for _, r in ipairs(rows) do assert.are.equal("api:a", r.instance) end
      rows = assert(st:logs { instance = "api:b", stream = "stdout", limit = 5 })
      assert.are.equal(5, #rows)
      for _, r in ipairs(rows) do
        assert.are.equal("stdout", r.stream)
        assert.are.equal("api:b", r.instance)
      end
      rows = assert(st:logs { since = t0 + 299.99, limit = 1000 })
      assert.are.equal(11, #rows) -- lines 299990 to 300000
      -- a query with FTS5 syntax in it is taken as words, never an error
      assert.is_table(assert(st:logs { q = 'OR AND "( NEAR* -x' }))
      st:close()
    end)
  end)

  -- Schema 2 indexed each line from a trigger; 3 indexes a batch at once.
  -- A store written by the older ten keeps what it had indexed and indexes
  -- what comes after, and the trigger does not index lines twice.
  it("upgrades a store of schema 2: old and new lines are found, each once", function()
    core.run(function()
      local conn = assert(core.db.open(dir .. "/old.db"))
      for v = 1, 2 do assert(conn:exec(store.migrations[v])) end
      assert(conn:exec("PRAGMA user_version = 2"))
      local ins = assert(conn:prepare("INSERT INTO log_lines (ts, instance, stream, message) VALUES (?, ?, ?, ?)"))
      local t0 = core.time() - 100
      local old = {}
      for i = 1, 500 do old[i] = { t0 + i / 100, "api:a", "stdout", "before upgrade line " .. i } end
      assert(ins:run_many(old))
      ins:close()
      conn:close()

      local st = assert(store.open(dir .. "/old.db"))
      assert.are.equal(#store.migrations, st.conn:query("PRAGMA user_version")[1].user_version)
      assert.are.equal(0, #st.conn:query("SELECT name FROM sqlite_master WHERE name = 'log_lines_indexed'"))
      local new = {}
      for i = 1, 500 do new[i] = { t0 + 10 + i / 100, "api:b", "stderr", "after upgrade line " .. i } end
      assert.are.equal(500, assert(st:append_logs(new)))
      assert.are.equal(500, #assert(st:logs { q = "before upgrade", limit = 1000 }))
      assert.are.equal(500, #assert(st:logs { q = "after upgrade", limit = 1000 }))
      local rows = assert(st:logs { q = "line 250", limit = 10 })
      assert.are.equal(2, #rows)
      assert.are.equal("after upgrade line 250", rows[1].message)
      assert.are.equal("[line] [250]", rows[1].highlighted:match("%[line%] %[250%]"))
      assert.are.equal("before upgrade line 250", rows[2].message)
      -- every line is in the full-text index exactly once
      local docs = st.conn:query("SELECT count(*) AS n FROM log_search WHERE log_search MATCH 'upgrade'")
      assert.are.equal(1000, docs[1].n)
      -- and pruning still takes lines out of the index
      -- (two instances as big: each keeps its share, 300)
      assert(st:prune_logs { max_age = 86400, max_lines = 600 })
      assert.are.equal(300, #assert(st:logs { q = "before upgrade", limit = 1000 }))
      assert.are.equal(300, #assert(st:logs { q = "after upgrade", limit = 1000 }))
      st:close()
    end)
  end)

  -- Schema 5 keeps the pid of each line's process; a store of schema 4
  -- keeps its lines, which name none.
  it("keeps each line's pid, and upgrades a store of schema 4 whose lines have none", function()
    core.run(function()
      local conn = assert(core.db.open(dir .. "/four.db"))
      for v = 1, 4 do assert(conn:exec(store.migrations[v])) end
      assert(conn:exec("PRAGMA user_version = 4"))
      assert(conn:exec("INSERT INTO log_lines (ts, instance, stream, message, seq) VALUES (1, 'api:a', 'stdout', 'old line', 1)"))
      assert(conn:exec("INSERT INTO log_search (rowid, message) VALUES (1, 'old line')"))
      conn:close()

      local st = assert(store.open(dir .. "/four.db"))
      assert.are.equal(#store.migrations, st.conn:query("PRAGMA user_version")[1].user_version)
      -- a row as the sink gives it: with the writer's pid, or without one
      assert.are.equal(2, assert(st:append_logs {
        { 2, "api:a", "stdout", "new line from 4242", 4242 },
        { 3, "api:a", "stderr", "new line from nobody" },
      }))
      local rows = assert(st:logs { instance = "api:a", limit = 10 })
      assert.are.same({ "new line from nobody", "new line from 4242", "old line" },
        { rows[1].message, rows[2].message, rows[3].message })
      assert.is_nil(rows[1].pid)
      assert.are.equal(4242, rows[2].pid)
      assert.is_nil(rows[3].pid)
      assert.are.same({ 3, 2, 1 }, { rows[1].seq, rows[2].seq, rows[3].seq })
      assert.are.equal(4242, assert(st:logs { q = "4242" })[1].pid)
      st:close()
    end)
  end)

  it("takes a q with a NUL byte as words and a fractional limit as a count, never an SQL error", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local batch = {}
      for i = 1, 20 do batch[i] = { core.time(), "api:a", "stdout", "plain line " .. i } end
      batch[21] = { core.time(), "api:a", "stdout", "nul\0separated words" }
      assert(st:append_logs(batch))
      -- a NUL ended FTS5's reading of the query inside a quoted term
      local rows, err = st:logs { q = "nul\0separated", limit = 10 }
      assert.is_nil(err)
      assert.are.equal(1, #rows)
      assert.are.equal("nul\0separated words", rows[1].message)
      -- LIMIT 2.5 is a datatype mismatch to SQLite
      rows, err = st:logs { limit = 2.5 }
      assert.is_nil(err)
      assert.are.equal(2, #rows)
      rows, err = st:logs { q = "plain", limit = 2.5 }
      assert.is_nil(err)
      assert.are.equal(2, #rows)
      st:close()
    end)
  end)

  it("highlights a line holding a NUL in whole, where FTS5's highlight() dropped the bytes after the NUL", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      assert(st:append_logs {
        { core.time(), "api:a", "stdout", "frame \0\1 bad: checksum mismatch, checksum again" },
      })
      local rows = assert(st:logs { q = "checksum mism" })
      assert.are.equal(1, #rows)
      assert.are.equal("frame \0\1 bad: [checksum] [mismatch], [checksum] again", rows[1].highlighted)
      st:close()
    end)
  end)

  it("highlights as FTS5's highlight() does, on lines it reads whole", function()
    core.run(function()
      local conn = assert(core.db.open(":memory:"))
      assert(conn:exec("CREATE VIRTUAL TABLE t USING fts5 (message, tokenize = 'no_escapes unicode61')"))
      local lines = {
        "ERROR database unreachable after 3 tries",
        "foo-bar baz foo bar foobar",
        "Wörld, world! WORLD... worldwide",
        "Ошибка: диск полон, ошибка диска",
        "a a a b a",
        "x=1 y=2 -> z",
        "[already] [bracketed] text",
        "  spaced   out   words  ",
        "température → 20 °C « élevée »",
        "GET /api/users/42?x=1 200 3ms",
        "\27[1;31mERROR\27[0m database \27[4mdown\27[24m",
        "see \27]8;;http://x.test/doc\27\\the doc\27]8;;\27\\ on \27(Bdatabase",
      }
      for i, line in ipairs(lines) do assert(conn:run("INSERT INTO t (rowid, message) VALUES (?, ?)", i, line)) end
      local queries = { "database unreach", "foo-bar", "foo bar", "world", "wor", "ошибка диск", "a", "a b",
        "x=1 z", "bracket", "spaced words", "temp → élevée", "api users 4", "-> z", "b a" }
      local compared = 0
      for _, q in ipairs(queries) do
        local match = store.fts_query(q)
        local rows = assert(conn:query("SELECT message, highlight(t, 0, '[', ']') AS h FROM t WHERE t MATCH ?", match))
        for _, r in ipairs(rows) do
          assert.are.equal(r.h, store.highlight(r.message, q), q .. " in " .. r.message)
          compared = compared + 1
        end
      end
      assert.is_true(compared >= 15, "only " .. compared .. " matches compared")
      -- and over lines and queries drawn from a vocabulary of words, cut words,
      -- punctuation and scripts (a generator of its own: the same draws every run)
      local seed = 42
      local function draw(n)
        seed = (seed * 1103515245 + 12345) % 2147483648
        return seed % n + 1
      end
      local vocab = { "foo", "bar", "Foo-Bar", "baz", "é", "Été", "ошибка", "x=1", "->", "—", "a", "ab", "abc",
        "42", "[x]", "foo.bar", "…", "«", "»", "__", "a_b", "\27[31mfoo\27[0m", "\27[1;4m", "\27]0;t\7", "\27" }
      local seps = { " ", "  ", ", ", "-", "/", ": ", "\t" }
      assert(conn:exec("DELETE FROM t"))
      for i = 1, 200 do
        local parts = {}
        for _ = 1, draw(10) do parts[#parts + 1] = vocab[draw(#vocab)] .. seps[draw(#seps)] end
        assert(conn:run("INSERT INTO t (rowid, message) VALUES (?, ?)", i, table.concat(parts)))
      end
      compared = 0
      for _ = 1, 150 do
        local words = {}
        for _ = 1, draw(3) do
          local w = vocab[draw(#vocab)]
          if draw(3) == 1 then w = w:sub(1, math.max(1, #w - 1)) end
          words[#words + 1] = w
        end
        local q = table.concat(words, " ")
        local match = store.fts_query(q)
        for _, r in ipairs(match and assert(conn:query(
            "SELECT message, highlight(t, 0, '[', ']') AS h FROM t WHERE t MATCH ?", match)) or {}) do
          assert.are.equal(r.h, store.highlight(r.message, q), q .. " in " .. r.message)
          compared = compared + 1
        end
      end
      assert.is_true(compared >= 1000, "only " .. compared .. " random matches compared")
      conn:close()
    end)
  end)

  it("finds coloured lines by their words, and keeps each line's escapes as written", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local lines = {
        "\27[31mERROR\27[0m payment failed",                         -- SGR colour
        "\27[1;38;5;208mwarn\27[m disk nearly full",                 -- 256 colours
        "open \27]8;;https://x.test/run/7\7the run\27]8;;\7 now", -- a hyperlink, ended by BEL
        "title \27]0;deploying\27\\ set, charset \27(Bascii",       -- OSC ended by ST; ESC ( B
        "cut short at the end \27[38;5",                             -- a sequence the line cuts
        "plain error in a line without escapes",
      }
      local batch = {}
      for i, line in ipairs(lines) do batch[i] = { core.time(), "api:a", "stdout", line } end
      assert(st:append_logs(batch))
      local function found(q)
        local out = {}
        for _, r in ipairs(assert(st:logs { q = q })) do out[#out + 1] = r.message end
        table.sort(out)
        return out
      end
      assert.are.same({ lines[1], lines[6] }, found("error"))
      assert.are.same({ lines[2] }, found("warn disk"))
      assert.are.same({ lines[3] }, found("the run now"))
      assert.are.same({ lines[4] }, found("title set charset ascii"))
      assert.are.same({ lines[5] }, found("the end"))
      -- the escapes' own bytes are no words: the colour, the link's address
      for _, q in ipairs { "31m", "0m", "208mwarn", "38", "https", "deploying", "Bascii" } do
        assert.are.same({}, found(q), q)
      end
      local rows = assert(st:logs { q = "payment" })
      assert.are.equal("\27[31m[ERROR]\27[0m [payment] failed",
        (store.highlight(rows[1].message, "error payment")))
      st:close()
    end)
  end)

  it("upgrades a store of schema 5: its coloured lines are found by their words", function()
    core.run(function()
      local conn = assert(core.db.open(dir .. "/five.db"))
      for v = 1, 5 do assert(conn:exec(store.migrations[v])) end
      assert(conn:exec("PRAGMA user_version = 5"))
      local ins = assert(conn:prepare("INSERT INTO log_lines (ts, instance, stream, message, seq) VALUES (?, ?, ?, ?, ?)"))
      local old = {}
      for i = 1, 300 do old[i] = { i, "api:a", "stdout", "\27[32mready\27[0m line " .. i, i } end
      assert(ins:run_many(old))
      ins:close()
      assert(conn:exec("INSERT INTO log_search (rowid, message) SELECT seq, message FROM log_lines"))
      assert(conn:exec("INSERT OR REPLACE INTO log_seq (one, last) VALUES (1, 300)"))
      -- as schema 5 indexed it: the colour glued to the word
      assert.are.equal(300, conn:query("SELECT count(*) AS n FROM log_search WHERE log_search MATCH '\"32mready\"'")[1].n)
      conn:close()

      local st = assert(store.open(dir .. "/five.db"))
      assert.are.equal(300, #assert(st:logs { q = "ready", limit = 1000 }))
      assert.are.equal(0, #assert(st:logs { q = "32mready", limit = 1000 }))
      -- the rebuilt index still loses pruned lines: an index that disagreed
      -- with the lines about a line's words would be corrupt here
      assert(st:prune_logs { max_age = 1e10, max_lines = 100 })
      assert.are.equal(100, #assert(st:logs { q = "ready", limit = 1000 }))
      assert(st.conn:exec("INSERT INTO log_search (log_search, rank) VALUES ('integrity-check', 1)"))
      st:close()
    end)
  end)

  -- A store holding `lines`: each of `queries` finds exactly one of them,
  -- `nothing` (punctuation alone) finds none rather than every line.
  local function each_finds_one(lines, queries, nothing)
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local batch = {}
      for i, line in ipairs(lines) do batch[i] = { core.time(), "api:a", "stdout", line } end
      assert(st:append_logs(batch))
      for _, q in ipairs(queries) do
        local rows = assert(st:logs { q = q })
        assert.are.equal(1, #rows, q)
      end
      assert.are.equal(0, #assert(st:logs { q = nothing }))
      st:close()
    end)
  end

  it("finds a line by its own text when q holds words of punctuation only", function()
    -- such a word has no token for the index: FTS5 took its empty phrase
    -- as matching no line, so the whole search found nothing
    each_finds_one({ "request status = 500 (took 3 ms) - retrying", "GET /api/users -> 200" },
      { "status = 500", "took 3 ms) - retrying", "GET /api/users -> 200", "users ->" }, "= ->")
  end)

  it("finds a line when q holds punctuation of other scripts, and letters of any", function()
    each_finds_one({ "deploy — done in 3 s", "température → 20 °C « élevée »", "Ошибка: диск полон" },
      { "deploy — done", "→ 20 °C", "« élevée »", "Ошибка: диск", "température →" }, "— → «")
  end)

  it("refuses a q of more words than it searches at once, before SQLite spends seconds on it", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local batch = {}
      for i = 1, 5000 do batch[i] = { core.time(), "api:a", "stdout", "a line " .. i } end
      assert(st:append_logs(batch))
      assert.are.equal(10, #assert(st:logs { q = string.rep("a ", store.MAX_QUERY_WORDS), limit = 10 }))
      -- 4000 words (8 KB, a request head holds 16) took FTS5 about 3 s, the
      -- store's one connection held all along: refused by the word count,
      -- before SQLite sees it
      local rows, err = st:logs { q = string.rep("a ", 4000) }
      assert.is_nil(rows)
      assert.matches("q has 4000 words, at most " .. store.MAX_QUERY_WORDS, err, 1, true)
      st:close()
    end)
  end)

  it("with after, returns the lines right after it, so a reader pages forward without a gap", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local batch = {}
      for i = 1, 50 do batch[i] = { core.time(), "api:a", "stdout", "page line " .. i } end
      assert(st:append_logs(batch))
      for _, q in ipairs { false, "page" } do
        local seen, after = {}, 0
        for _ = 1, 10 do
          local rows = assert(st:logs { after = after, limit = 20, q = q or nil })
          if #rows == 0 then break end
          -- newest first, like every answer of Store:logs
          for i = 2, #rows do assert.is_true(rows[i - 1].seq > rows[i].seq) end
          for i = #rows, 1, -1 do seen[#seen + 1] = rows[i].message end
          after = rows[1].seq
        end
        assert.are.equal(50, #seen)
        for i = 1, 50 do assert.are.equal("page line " .. i, seen[i]) end
      end
      st:close()
    end)
  end)

  it("never gives a seq twice, even after pruning took every line", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local old = {}
      for i = 1, 10 do old[i] = { core.time() - 10 * 86400, "api:a", "stdout", "old line " .. i } end
      assert(st:append_logs(old))
      assert.are.equal(10, st:logs { limit = 1 }[1].seq)
      -- a store quiet for longer than the retention loses every line
      assert(st:prune_logs { max_age = 7 * 86400, max_lines = 1000 })
      assert.are.equal(0, #assert(st:logs {}))
      assert(st:append_logs { { core.time(), "api:a", "stdout", "new line" } })
      -- a reader that got up to seq 10 (the event stream, Last-Event-ID)
      -- must see the new line after it
      local rows = assert(st:logs { after = 10 })
      assert.are.equal(1, #rows)
      assert.are.equal("new line", rows[1].message)
      st:close()
      st = assert(store.open(dir .. "/t.db"))
      assert(st:prune_logs { max_age = 0, max_lines = 1000 })
      assert(st:append_logs { { core.time(), "api:a", "stdout", "newer line" } })
      rows = assert(st:logs { after = 11 })
      assert.are.equal(1, #rows)
      assert.are.equal("newer line", rows[1].message)
      assert.are.equal(1, #assert(st:logs { q = "newer" }))
      st:close()
    end)
  end)

  -- a million lines of 16 KiB are 16 GB: a bound in lines alone let one
  -- app fill the disk
  it("prunes past a bound in bytes of text, the biggest instance first", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local now = core.time()
      local batch = {}
      for i = 1, 200 do batch[#batch + 1] = { now, "quiet:a", "stdout", string.format("quiet %4d", i) .. ("q"):rep(990) } end
      for i = 1, 3000 do batch[#batch + 1] = { now, "wide:a", "stdout", string.format("wide %4d", i) .. ("w"):rep(991) } end
      assert(st:append_logs(batch))
      -- 3.2 MB of text, 1 MB allowed: about 1000 lines of 1000 bytes stay
      local _, more = assert(st:prune_logs { max_age = 86400, max_lines = 1000000, max_bytes = 1000 * 1000 })
      assert.is_false(more)
      local function count(instance)
        return st.conn:query("SELECT count(*) AS n FROM log_lines WHERE instance = ?", instance)[1].n
      end
      assert.are.same({ 200, 800 }, { count("quiet:a"), count("wide:a") })
      assert.matches("^wide 3000", st:logs { instance = "wide:a", limit = 1 }[1].message)
      -- under the bound: nothing goes
      assert(st:prune_logs { max_age = 86400, max_lines = 1000000, max_bytes = 1000 * 1000 })
      assert.are.same({ 200, 800 }, { count("quiet:a"), count("wide:a") })
      st:close()
    end)
  end)

  it("prunes by count the oldest lines of the instance holding the most, not its neighbours'", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local now = core.time()
      local batch = {}
      for i = 1, 500 do batch[#batch + 1] = { now, "quiet:a", "stdout", "quiet " .. i } end
      for i = 1, 12000 do batch[#batch + 1] = { now, "loud:a", "stdout", "loud " .. i } end
      for i = 1, 300 do batch[#batch + 1] = { now, "quiet:b", "stdout", "later " .. i } end
      assert(st:append_logs(batch))
      local _, more = assert(st:prune_logs { max_age = 86400, max_lines = 2000, chunk = 5000 })
      assert.is_false(more)
      local function count(instance)
        return st.conn:query("SELECT count(*) AS n FROM log_lines WHERE instance = ?", instance)[1].n
      end
      -- the flood erased its own lines: the others keep every one of theirs
      assert.are.equal(500, count("quiet:a"))
      assert.are.equal(300, count("quiet:b"))
      assert.are.equal(1200, count("loud:a"))
      assert.are.equal("loud 12000", st:logs { instance = "loud:a", limit = 1 }[1].message)
      -- the index follows
      assert.are.equal(0, #assert(st:logs { q = "10800", limit = 10 }))
      assert.are.equal(1, #assert(st:logs { q = "10801", limit = 10 }))
      -- past their share, the biggest come down to one level, the lowest
      -- that keeps 1000 (quiet:b, below it, keeps all it has)
      assert(st:prune_logs { max_age = 86400, max_lines = 1000, chunk = 400 })
      assert.are.same({ 350, 350, 300 }, { count("quiet:a"), count("loud:a"), count("quiet:b") })
      -- by age, a chunk a call, and says when more is left
      batch = {}
      for i = 1, 7 do batch[i] = { now - 10 * 86400, "old:a", "stdout", "old " .. i } end
      assert(st:append_logs(batch))
      _, more = assert(st:prune_logs { max_age = 86400, max_lines = 100000, chunk = 5 })
      assert.is_true(more)
      _, more = assert(st:prune_logs { max_age = 86400, max_lines = 100000, chunk = 5 })
      assert.is_false(more)
      assert.are.equal(0, #assert(st:logs { q = "old", limit = 10 }))
      st:close()
    end)
  end)

  it("prunes logs by age and by count", function()
    core.run(function()
      local st = assert(store.open(dir .. "/t.db"))
      local now = core.time()
      local batch = {}
      for i = 1, 2000 do
        batch[i] = { (i <= 500) and (now - 10 * 86400) or now, "api:a", "stdout", "line " .. i }
      end
      assert(st:append_logs(batch))
      assert(st:prune_logs { max_age = 7 * 86400, max_lines = 1000 })
      local rows = assert(st:logs { limit = 10000 })
      assert.are.equal(1000, #rows)
      assert.are.equal("line 2000", rows[1].message)
      assert.are.equal("line 1001", rows[#rows].message)
      -- the index follows: pruned lines are not found any more
      assert.are.equal(0, #assert(st:logs { q = "500", limit = 10 }))
      st:close()
    end)
  end)
end)
