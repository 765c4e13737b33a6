-- core.db: SQLite off the loop thread, against real files.
local core = require "tenement.core"
local db, fs, crypto = core.db, core.fs, core.crypto

local function tmpdir()
  local dir = (os.getenv("TMPDIR") or "/tmp") .. "/tn-db-spec-" .. crypto.hex(crypto.random(8))
  assert(fs.mkdir(dir, 448))
  return dir
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function size(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local n = f:seek("end")
  f:close()
  return n
end

-- Run fn(...) twice: outside any task (synchronous), then inside a task
-- (the thread pool path). Both must behave the same.
local function both(fn)
  fn("sync")
  core.run(fn, "task")
end

describe("core.db", function()
  local dir, path

  before_each(function()
    dir = tmpdir()
    path = dir .. "/test.db"
  end)

  after_each(function()
    collectgarbage()
    fs.rmtree(dir)
  end)

  describe("open and close", function()
    it("opens a file in WAL mode with FULL sync and foreign keys, and closes it", function()
      both(function(mode)
        local conn = assert(db.open(path))
        assert.matches("tenement.db.conn %(.*test%.db%)", tostring(conn))
        assert.are.equal("wal", conn:query("PRAGMA journal_mode")[1].journal_mode)
        assert.are.equal(2, conn:query("PRAGMA synchronous")[1].synchronous)
        assert.are.equal(1, conn:query("PRAGMA foreign_keys")[1].foreign_keys)
        assert.is_true(conn:exec("CREATE TABLE IF NOT EXISTS t(x)"))
        assert.is_true(exists(path .. "-wal"), mode)
        assert.is_true(conn:close())
        -- the last connection's close checkpoints and removes the log
        assert.is_false(exists(path .. "-wal"), mode)
        assert.is_true(conn:close()) -- idempotent
        assert.are.equal("tenement.db.conn (closed)", tostring(conn))
      end)
    end)

    it("raises when a closed connection is used", function()
      both(function()
        local conn = assert(db.open(path))
        conn:close()
        assert.has_error(function() conn:query("SELECT 1") end, "core.db: the connection is closed")
        assert.has_error(function() conn:run("SELECT 1") end, "core.db: the connection is closed")
        assert.has_error(function() conn:exec("SELECT 1") end, "core.db: the connection is closed")
        assert.has_error(function() conn:prepare("SELECT 1") end, "core.db: the connection is closed")
        assert.has_error(function() conn:transaction(function() end) end,
          "core.db: the connection is closed")
      end)
    end)

    it("reports what failed and why when a database cannot be opened", function()
      both(function()
        local conn, err, code = db.open(dir .. "/missing/dir/x.db")
        assert.is_nil(conn)
        assert.are.equal("open " .. dir .. "/missing/dir/x.db: unable to open database file (No such file or directory)", err)
        assert.are.equal("SQLITE_CANTOPEN", code)

        conn, err, code = db.open(dir .. "/absent.db", { readonly = true })
        assert.is_nil(conn)
        assert.are.equal("SQLITE_CANTOPEN", code)
        assert.is_false(exists(dir .. "/absent.db"))

        local f = assert(io.open(dir .. "/junk.db", "wb"))
        f:write(string.rep("this is not a database\n", 200))
        f:close()
        conn, err, code = db.open(dir .. "/junk.db")
        assert.is_nil(conn)
        assert.matches("^open .*junk%.db: file is not a database", err)
        assert.are.equal("SQLITE_NOTADB", code)
      end)
    end)

    it("names the file, not the statement, when the file is damaged", function()
      local w = assert(db.open(path))
      assert(w:exec("CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
        .. "INSERT INTO t SELECT printf('%0400d', i) FROM n"))
      w:close()
      -- a page in the middle of the table overwritten, as a failing disk may
      local f = assert(io.open(path, "r+b"))
      f:seek("set", 40 * 4096)
      f:write(string.rep("\255", 4096))
      f:close()
      both(function()
        local r = assert(db.open(path))
        local rows, err, code = r:query("SELECT count(*) AS k, max(x) AS m FROM t")
        assert.is_nil(rows)
        assert.are.equal("SQLITE_CORRUPT", code)
        assert.are.equal("query: database disk image is malformed (" .. path .. ")", err)
        r:close()
      end)
    end)

    it("opens read-only: reads work, writes fail with SQLITE_READONLY", function()
      local w = assert(db.open(path))
      assert(w:exec("CREATE TABLE t(x); INSERT INTO t VALUES (7)"))
      both(function()
        local r = assert(db.open(path, { readonly = true }))
        assert.are.equal(7, r:query("SELECT x FROM t")[1].x)
        local ok, err, code = r:run("INSERT INTO t VALUES (8)")
        assert.is_nil(ok)
        assert.matches("readonly", err)
        assert.are.equal("SQLITE_READONLY", code)
        r:close()
      end)
      w:close()
    end)

    it("opens an in-memory database", function()
      both(function()
        local conn = assert(db.open(":memory:"))
        assert.are.equal("memory", conn:query("PRAGMA journal_mode")[1].journal_mode)
        assert(conn:exec("CREATE TABLE t(x)"))
        assert.are.equal(1, conn:run("INSERT INTO t VALUES (1)").changes)
        conn:close()
      end)
    end)

    it("raises on bad arguments", function()
      assert.has_error(function() db.open() end)
      assert.has_error(function() db.open(path, "fast") end)
      assert.has_error(function() db.open(path, { readonly = "yes" }) end)
      assert.has_error(function() db.open(path, { busy_timeout_ms = -1 }) end)
      assert.has_error(function() db.open(path, { busy_timeout_ms = 1.5 }) end)
    end)

    it("closes a dropped connection when it is collected, and with <close>", function()
      do
        local conn = assert(db.open(path))
        assert(conn:exec("CREATE TABLE t(x)"))
      end
      collectgarbage()
      collectgarbage()
      assert.is_false(exists(path .. "-wal"))
      core.run(function()
        do
          local conn <close> = assert(db.open(path))
          assert(conn:run("INSERT INTO t VALUES (1)"))
          assert.is_true(exists(path .. "-wal"))
        end
        assert.is_false(exists(path .. "-wal"))
      end)
    end)
  end)

  describe("reading and writing", function()
    local conn
    before_each(function()
      conn = assert(db.open(path))
      assert(conn:exec([[
        CREATE TABLE v(id INTEGER PRIMARY KEY, i, r, t, b, n, yes, no);
        CREATE TABLE u(k TEXT UNIQUE NOT NULL);
        CREATE TABLE parent(id INTEGER PRIMARY KEY);
        CREATE TABLE child(pid INTEGER REFERENCES parent(id));
      ]]))
    end)
    after_each(function() conn:close() end)

    it("binds and returns every type", function()
      both(function(mode)
        local blob = "\0\1\2\255\0" .. mode .. "\0"
        local res = assert(conn:run("INSERT INTO v(i, r, t, b, n, yes, no) VALUES (?, ?, ?, ?, ?, ?, ?)",
          math.maxinteger, 2.0, "héllo " .. mode, db.blob(blob), nil, true, false))
        assert.are.equal(1, res.changes)
        local rows = assert(conn:query([[SELECT i, r, t, b, n, yes, no, typeof(i) AS ti,
          typeof(r) AS tr, typeof(t) AS tt, typeof(b) AS tb, typeof(n) AS tn
          FROM v WHERE id = ?]], res.last_id))
        assert.are.equal(1, #rows)
        local row = rows[1]
        assert.are.equal(math.maxinteger, row.i)
        assert.are.equal("integer", math.type(row.i))
        assert.are.equal(2.0, row.r)
        assert.are.equal("float", math.type(row.r))
        assert.are.equal("héllo " .. mode, row.t)
        assert.are.equal(blob, row.b)
        assert.are.equal(#blob, #row.b)
        assert.is_nil(row.n)
        assert.are.equal(1, row.yes)
        assert.are.equal(0, row.no)
        assert.are.same({ "integer", "real", "text", "blob", "null" },
          { row.ti, row.tr, row.tt, row.tb, row.tn })
        assert.are.same({ "i", "r", "t", "b", "n", "yes", "no", "ti", "tr", "tt", "tb", "tn" },
          rows.columns)
      end)
    end)

    it("keeps every byte value of a blob and of a text", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      both(function()
        local id = conn:run("INSERT INTO v(b, t) VALUES (?, ?)", db.blob(all), all).last_id
        local row = conn:query("SELECT b, t, length(b) AS n FROM v WHERE id = ?", id)[1]
        assert.are.equal(all, row.b)
        assert.are.equal(all, row.t)
        assert.are.equal(256, row.n)
      end)
      assert.are.equal(3, #db.blob("abc"))
      assert.are.equal("abc", tostring(db.blob("abc")))
      assert.has_error(function() db.blob(12) end)
    end)

    it("creates, reads, updates and deletes, counting changes", function()
      both(function(mode)
        conn:run("DELETE FROM v")
        local ids = {}
        for i = 1, 3 do
          local res = assert(conn:run("INSERT INTO v(i, t) VALUES (?, ?)", i, mode))
          assert.are.equal(1, res.changes)
          ids[i] = res.last_id
        end
        assert.is_true(ids[2] > ids[1] and ids[3] > ids[2])
        assert.are.equal(2, conn:run("UPDATE v SET t = 'big' WHERE i >= 2").changes)
        assert.are.same({ { i = 1, t = mode }, { i = 2, t = "big" }, { i = 3, t = "big" } },
          (function()
            local rows = conn:query("SELECT i, t FROM v ORDER BY i")
            rows.columns = nil
            return rows
          end)())
        -- a statement that changes nothing reports 0, not the last count
        assert.are.equal(0, conn:run("CREATE TABLE IF NOT EXISTS v(x)").changes)
        assert.are.equal(0, conn:run("UPDATE v SET t = 'x' WHERE i > 100").changes)
        assert.are.equal(3, conn:run("DELETE FROM v").changes)
        local rows = conn:query("SELECT * FROM v")
        assert.are.equal(0, #rows)
        assert.are.same({ "id", "i", "r", "t", "b", "n", "yes", "no" }, rows.columns)
      end)
    end)

    it("binds positional and named parameters", function()
      both(function()
        local row = conn:query("SELECT ? AS a, ? AS b, ? AS c", 1, "two", 3.5)[1]
        assert.are.same({ a = 1, b = "two", c = 3.5 }, row)
        row = conn:query("SELECT ?2 AS a, ?1 AS b, ?2 AS c", "x", "y")[1]
        assert.are.same({ a = "y", b = "x", c = "y" }, row)
        row = conn:query("SELECT :a AS a, @b AS b, $c AS c, :missing AS m",
          { a = 1, b = "two", c = false, unused = "ignored" })[1]
        assert.are.same({ a = 1, b = "two", c = 0 }, row)
        row = conn:query("SELECT :a AS a", { [":a"] = "prefixed" })[1]
        assert.are.equal("prefixed", row.a)
        -- a table binds unnamed parameters by index, holes as NULL
        row = conn:query("SELECT ? AS a, ? AS b, ? AS c", { 10, nil, 30 })[1]
        assert.are.same({ a = 10, c = 30 }, row)
        -- explicit nils are values
        row = conn:query("SELECT ? AS a, ? AS b", nil, 2)[1]
        assert.are.same({ b = 2 }, row)
      end)
    end)

    it("returns nil, err, SQLITE_RANGE when positional values do not match", function()
      both(function()
        local rows, err, code = conn:query("SELECT ?, ?", 1)
        assert.is_nil(rows)
        assert.are.equal("query: 1 value given for 2 parameters (in: SELECT ?, ?)", err)
        assert.are.equal("SQLITE_RANGE", code)
        rows, err, code = conn:query("SELECT 1", 1, 2)
        assert.is_nil(rows)
        assert.are.equal("query: 2 values given for 0 parameters (in: SELECT 1)", err)
        assert.are.equal("SQLITE_RANGE", code)
      end)
    end)

    it("raises on values it cannot bind", function()
      both(function()
        assert.has_error(function() conn:query("SELECT ?, ?", 1, {}) end,
          "core.db: cannot bind table as value #2 (bind nil, booleans, numbers, strings or core.db.blob(s))")
        assert.has_error(function() conn:run("SELECT ?", print) end)
        assert.has_error(function() conn:run("SELECT ?", coroutine.create(print)) end)
        assert.has_error(function() conn:run("SELECT ?", io.stdout) end)
        assert.has_error(function() conn:query("SELECT :a", { a = {} }) end,
          "core.db: cannot bind table for 'a' (bind nil, booleans, numbers, strings or core.db.blob(s))")
        assert.has_error(function() conn:query("SELECT :a", { [true] = 1 }) end)
        assert.has_error(function() conn:query("SELECT :a", { [1.5] = 1 }) end)
        assert.has_error(function() conn:query({}) end)
        -- the connection is fine afterwards
        assert.are.equal(1, conn:query("SELECT 1 AS x")[1].x)
      end)
    end)

    it("keeps column order in rows.columns, including repeated names", function()
      both(function()
        local rows = conn:query("SELECT 1 AS z, 2 AS a, 3 AS z, NULL AS m")
        assert.are.same({ "z", "a", "z", "m" }, rows.columns)
        assert.are.equal(3, rows[1].z) -- the last of a repeated name wins
        assert.is_nil(rows[1].m)
        -- a statement without result columns gives an empty result
        rows = assert(conn:query("INSERT INTO u(k) VALUES (?)", crypto.hex(crypto.random(8))))
        assert.are.equal(0, #rows)
        assert.are.same({}, rows.columns)
      end)
    end)

    it("returns SQLite's message with the SQL and a code on errors", function()
      both(function()
        local res, err, code = conn:query("SELECT * FROM x")
        assert.is_nil(res)
        assert.are.equal("query: no such table: x (in: SELECT * FROM x)", err)
        assert.are.equal("SQLITE_ERROR", code)

        res, err, code = conn:run("SELEKT 1")
        assert.is_nil(res)
        assert.are.equal('run: near "SELEKT": syntax error (in: SELEKT 1)', err)
        assert.are.equal("SQLITE_ERROR", code)

        res, err, code = conn:exec("CREATE TABLE v(x)")
        assert.is_nil(res)
        assert.are.equal("exec: table v already exists (in: CREATE TABLE v(x))", err)
        assert.are.equal("SQLITE_ERROR", code)

        res, err, code = conn:prepare("SELECT nope FROM v")
        assert.is_nil(res)
        assert.are.equal("prepare: no such column: nope (in: SELECT nope FROM v)", err)
        assert.are.equal("SQLITE_ERROR", code)

        local long = "SELECT " .. string.rep("1 + ", 100) .. "no_such_column"
        res, err = conn:query(long)
        assert.is_nil(res)
        assert.matches("^query: no such column: no_such_column %(in: SELECT 1 %+ 1 .*%.%.%.%)$", err)
        assert.is_true(#err < 260)
      end)
    end)

    it("returns SQLITE_CONSTRAINT on unique, not null and foreign key violations", function()
      both(function()
        conn:run("DELETE FROM u")
        assert(conn:run("INSERT INTO u(k) VALUES (?)", "a"))
        local res, err, code = conn:run("INSERT INTO u(k) VALUES (?)", "a")
        assert.is_nil(res)
        assert.are.equal("run: UNIQUE constraint failed: u.k (in: INSERT INTO u(k) VALUES (?))", err)
        assert.are.equal("SQLITE_CONSTRAINT", code)

        res, err, code = conn:run("INSERT INTO u(k) VALUES (NULL)")
        assert.is_nil(res)
        assert.matches("NOT NULL constraint failed: u.k", err)
        assert.are.equal("SQLITE_CONSTRAINT", code)

        res, err, code = conn:run("INSERT INTO child(pid) VALUES (42)")
        assert.is_nil(res)
        assert.matches("FOREIGN KEY constraint failed", err)
        assert.are.equal("SQLITE_CONSTRAINT", code)
      end)
    end)

    it("takes exactly one statement in query, run and prepare; several in exec", function()
      both(function()
        local res, err, code = conn:query("SELECT 1; SELECT 2")
        assert.is_nil(res)
        assert.matches("more than one statement", err)
        assert.are.equal("SQLITE_MISUSE", code)
        res, err = conn:prepare("SELECT 1; DELETE FROM v")
        assert.is_nil(res)
        assert.matches("more than one statement", err)
        -- trailing blanks, semicolons and comments are fine
        assert.are.equal(1, conn:query("SELECT 1 AS x; -- done\n ; ")[1].x)
        res, err = conn:query("  -- nothing\n")
        assert.is_nil(res)
        assert.matches("^query: no SQL statement", err)
        assert.is_true(conn:exec("INSERT INTO u(k) VALUES ('s1'); INSERT INTO u(k) VALUES ('s2');"))
        assert.are.equal(2, conn:run("DELETE FROM u WHERE k IN ('s1', 's2')").changes)
      end)
    end)
  end)

  describe("prepared statements", function()
    local conn
    before_each(function()
      conn = assert(db.open(path))
      assert(conn:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT UNIQUE, n INTEGER)"))
    end)
    after_each(function() conn:close() end)

    it("run and query many times with new binds", function()
      both(function(mode)
        conn:run("DELETE FROM t")
        local ins = assert(conn:prepare("INSERT INTO t(name, n) VALUES (:name, :n)"))
        assert.matches("^tenement.db.stmt %(INSERT INTO t", tostring(ins))
        for i = 1, 5 do
          local res = assert(ins:run({ name = mode .. i, n = i * i }))
          assert.are.equal(1, res.changes)
        end
        local sel = assert(conn:prepare("SELECT name, n FROM t WHERE n > ? ORDER BY n"))
        local rows = sel:query(4)
        assert.are.same({ "name", "n" }, rows.columns)
        assert.are.equal(3, #rows)
        assert.are.equal(mode .. "3", rows[1].name)
        assert.are.equal(0, #sel:query(100))
        assert.are.equal(5, #sel:query(0))
        -- an error leaves the statement usable
        local res, err, code = ins:run({ name = mode .. "1", n = 0 })
        assert.is_nil(res)
        assert.matches("UNIQUE constraint failed", err)
        assert.are.equal("SQLITE_CONSTRAINT", code)
        assert(ins:run({ name = mode .. "6", n = 36 }))
        assert.is_true(ins:close())
        assert.is_true(ins:close())
        assert.has_error(function() ins:run({}) end, "core.db: the statement is closed")
        sel:close()
      end)
    end)

    it("raises once its connection is closed", function()
      both(function()
        local c = assert(db.open(path))
        local st = assert(c:prepare("SELECT 1 AS x"))
        assert.are.equal(1, st:query()[1].x)
        c:close()
        assert.has_error(function() st:query() end, "core.db: the statement's connection is closed")
        assert.has_error(function() st:run_many({ {} }) end,
          "core.db: the statement's connection is closed")
        assert.is_true(st:close())
      end)
    end)

    it("keeps its connection alive", function()
      local st
      local other = dir .. "/other.db"
      do
        local c = assert(db.open(other))
        assert(c:exec("CREATE TABLE t(x)"))
        st = assert(c:prepare("SELECT count(*) AS k FROM t"))
      end
      collectgarbage()
      collectgarbage()
      assert.are.equal(0, st:query()[1].k)
      core.run(function() assert.are.equal(0, st:query()[1].k) end)
      -- the statement was the last holder: collecting it closes the connection
      st = nil
      collectgarbage()
      collectgarbage()
      assert.is_false(exists(other .. "-wal"))
    end)

    it("run_many inserts 10,000 rows in one transaction", function()
      both(function(mode)
        conn:run("DELETE FROM t")
        local ins = assert(conn:prepare("INSERT INTO t(name, n) VALUES (?, ?)"))
        local rows = {}
        for i = 1, 10000 do rows[i] = { mode .. i, i } end
        assert.are.equal(10000, ins:run_many(rows))
        local r = conn:query("SELECT count(*) AS k, sum(n) AS s FROM t")[1]
        assert.are.equal(10000, r.k)
        assert.are.equal(10000 * 10001 // 2, r.s)
        assert.are.equal(0, ins:run_many({}))
        -- named binds per row too
        local named = assert(conn:prepare("UPDATE t SET n = :n WHERE name = :name"))
        assert.are.equal(2, named:run_many({ { name = mode .. 1, n = -1 }, { name = mode .. 2, n = -2 },
          { name = "nobody", n = 0 } }))
        named:close()
        ins:close()
      end)
    end)

    it("run_many applies all rows or none", function()
      both(function(mode)
        conn:run("DELETE FROM t")
        local ins = assert(conn:prepare("INSERT INTO t(name) VALUES (?)"))
        local rows = {}
        for i = 1, 1000 do rows[i] = { mode .. i } end
        rows[500] = { mode .. 1 } -- duplicate
        local n, err, code = ins:run_many(rows)
        assert.is_nil(n)
        assert.are.equal("run_many: row 500: UNIQUE constraint failed: t.name (in: INSERT INTO t(name) VALUES (?))", err)
        assert.are.equal("SQLITE_CONSTRAINT", code)
        assert.are.equal(0, conn:query("SELECT count(*) AS k FROM t")[1].k)
        -- inside a transaction a failed batch is undone alone (a savepoint)
        local ok, e = conn:transaction(function()
          assert(conn:run("INSERT INTO t(name) VALUES ('kept')"))
          local m, err2 = ins:run_many(rows)
          assert.is_nil(m)
          assert.matches("row 500", err2)
          assert.are.equal(2, ins:run_many({ { "x" .. mode }, { "y" .. mode } }))
          return "done"
        end)
        assert.are.equal("done", ok, e)
        assert.are.equal(3, conn:query("SELECT count(*) AS k FROM t")[1].k)
        assert.has_error(function() ins:run_many({ { "a" }, "b" }) end,
          "core.db: run_many: row 2 is a string, not a table of binds")
        assert.has_error(function() ins:run_many({ { {} } }) end)
        assert.has_error(function() ins:run_many("rows") end)
        ins:close()
      end)
    end)
  end)

  describe("transactions", function()
    local conn
    before_each(function()
      conn = assert(db.open(path))
      assert(conn:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT)"))
    end)
    after_each(function() conn:close() end)

    local function count()
      return conn:query("SELECT count(*) AS k FROM t")[1].k
    end

    it("commits and returns the function's results", function()
      both(function(mode)
        local a, b, c = conn:transaction(function(cn)
          assert.are.equal(conn, cn)
          assert(cn:run("INSERT INTO t(who) VALUES (?)", mode))
          return "a", nil, 3
        end)
        assert.are.same({ "a", nil, 3 }, { a, b, c })
        assert.is_true(conn:transaction(function() conn:run("INSERT INTO t(who) VALUES ('x')") end))
        assert.are.equal(2, count())
        conn:run("DELETE FROM t")
      end)
    end)

    it("rolls back and re-raises when the function raises", function()
      both(function()
        local obj = { code = "E1" }
        local ok, err = pcall(conn.transaction, conn, function()
          assert(conn:run("INSERT INTO t(who) VALUES ('lost')"))
          error(obj)
        end)
        assert.is_false(ok)
        assert.are.equal(obj, err)
        assert.are.equal(0, count())
        ok, err = pcall(conn.transaction, conn, function()
          assert(conn:run("INSERT INTO t(who) VALUES ('lost')"))
          local x = nil
          return x.field
        end)
        assert.is_false(ok)
        assert.matches("attempt to index", err)
        assert.are.equal(0, count())
        -- usable again
        assert.is_true(conn:transaction(function() assert(conn:run("INSERT INTO t(who) VALUES ('y')")) end))
        assert.are.equal(1, count())
        conn:run("DELETE FROM t")
      end)
    end)

    it("rolls back when the function returns nil, err", function()
      both(function()
        local res, err, code = conn:transaction(function()
          assert(conn:run("INSERT INTO t(who) VALUES ('lost')"))
          return nil, "changed my mind", "E_MIND"
        end)
        assert.is_nil(res)
        assert.are.equal("changed my mind", err)
        assert.are.equal("E_MIND", code)
        assert.are.equal(0, count())
        res, err = conn:transaction(function()
          assert(conn:run("INSERT INTO t(who) VALUES ('lost')"))
          return nil
        end)
        assert.is_nil(res)
        assert.are.equal("transaction: aborted by the function", err)
        assert.are.equal(0, count())
      end)
    end)

    it("raises on a nested transaction, a bad argument, or close inside it", function()
      both(function()
        local ok, err = pcall(conn.transaction, conn, function()
          assert(conn:run("INSERT INTO t(who) VALUES ('lost')"))
          conn:transaction(function() end)
        end)
        assert.is_false(ok)
        assert.matches("nested transactions are not supported", err)
        assert.are.equal(0, count())
        assert.has_error(function() conn:transaction("BEGIN") end,
          "bad argument #1 to 'transaction' (function expected, got string)")
        ok, err = pcall(conn.transaction, conn, function() conn:close() end)
        assert.is_false(ok)
        assert.matches("close inside this caller's own transaction", err)
        assert.are.equal(0, count())
      end)
    end)

    it("lets the function wait for other things", function()
      core.run(function()
        assert.are.equal("ok", conn:transaction(function()
          assert(conn:run("INSERT INTO t(who) VALUES ('before')"))
          core.sleep(5)
          coroutine.yield()
          assert(conn:run("INSERT INTO t(who) VALUES ('after')"))
          return "ok"
        end))
        assert.are.equal(2, count())
      end)
    end)

    it("returns SQLITE_BUSY when another connection holds the write lock", function()
      local other = assert(db.open(path))
      local quick = assert(db.open(path, { busy_timeout_ms = 30 }))
      assert(other:exec("BEGIN IMMEDIATE"))
      both(function()
        local res, err, code = quick:transaction(function() error("never runs") end)
        assert.is_nil(res)
        -- another process's lock: the file is what the operator looks for
        assert.are.equal("begin: database is locked (" .. path .. ")", err)
        assert.are.equal("SQLITE_BUSY", code)
        res, err, code = quick:run("INSERT INTO t(who) VALUES ('q')")
        assert.is_nil(res)
        assert.matches("database is locked", err)
        assert.are.equal("SQLITE_BUSY", code)
        -- readers are not blocked by a writer in WAL mode
        assert.are.equal(0, quick:query("SELECT count(*) AS k FROM t")[1].k)
      end)
      assert(other:exec("ROLLBACK"))
      assert(quick:run("INSERT INTO t(who) VALUES ('q')"))
      quick:close()
      other:close()
    end)
  end)

  describe("on the loop", function()
    local conn
    before_each(function()
      conn = assert(db.open(path))
      assert(conn:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT)"))
    end)
    after_each(function() conn:close() end)

    it("runs operations of several tasks in FIFO order", function()
      core.run(function()
        local done, tasks = {}, {}
        for i = 1, 8 do
          tasks[i] = core.spawn(function()
            local res = assert(conn:run("INSERT INTO t(who) VALUES (?)", "task" .. i))
            done[#done + 1] = i
            return res.last_id
          end)
        end
        for i = 1, 8 do
          local ok, id = tasks[i]:join()
          assert.is_true(ok)
          assert.are.equal(i, id)
        end
        assert.are.same({ 1, 2, 3, 4, 5, 6, 7, 8 }, done)
      end)
    end)

    it("works on threads that end two seconds after the last operation", function()
      -- while a second thread lives, every system call on a descriptor pays
      -- for the shared file table: a server idle on SQLite must have none
      local function threads() return #assert(fs.readdir("/proc/self/task")) end
      core.run(function()
        local tasks = {}
        for i = 1, 8 do
          tasks[i] = core.spawn(function() assert(conn:run("INSERT INTO t(who) VALUES (?)", "x" .. i)) end)
        end
        for i = 1, 8 do assert.is_true((tasks[i]:join())) end
        assert.is_true(threads() > 1)
        local deadline = core.now() + 10000
        while threads() > 1 and core.now() < deadline do core.sleep(50) end
        assert.are.equal(1, threads())
        -- the next operation starts one again
        assert(conn:run("INSERT INTO t(who) VALUES ('again')"))
        assert.are.equal(2, threads())
        assert.are.equal(9, assert(conn:query("SELECT count(*) AS n FROM t"))[1].n)
      end)
    end)

    it("gives a second connection a thread of its own while the first is busy", function()
      core.run(function()
        assert(conn:run("INSERT INTO t(who) VALUES ('warm')")) -- one thread, idle now
        local other = assert(db.open(path))
        local order = {}
        local slow = core.spawn(function()
          assert(conn:query([[WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 2000000)
            SELECT count(*) AS n FROM c]]))
          order[#order + 1] = "slow"
        end)
        local quick = core.spawn(function()
          assert(other:query("SELECT 1 AS one"))
          order[#order + 1] = "quick"
        end)
        assert.is_true((slow:join()))
        assert.is_true((quick:join()))
        assert.are.same({ "quick", "slow" }, order)
        other:close()
      end)
    end)

    it("finishes every operation on the loop thread when no thread can be started", function()
      -- the process (or its cgroup) at its limit of tasks: pthread_create
      -- fails, and a task's call must still return, in order, with its result
      local build = os.getenv("TEN_BUILD") or "build"
      local helper = [[
        local core = require "tenement.core"
        core.run(function()
          local conn = assert(core.db.open(%q))
          assert(conn:exec("CREATE TABLE u(x)"))
          local tasks = {}
          for i = 1, 5 do
            tasks[i] = core.spawn(function() return assert(conn:run("INSERT INTO u VALUES (?)", i)).last_id end)
          end
          local ids = {}
          for i = 1, 5 do ids[i] = select(2, tasks[i]:join()) end
          local threads = #assert(core.fs.readdir("/proc/self/task"))
          print(table.concat(ids, " "), assert(conn:query("SELECT count(*) AS n FROM u"))[1].n, threads)
          conn:close()
        end)
      ]]
      helper = string.format(helper, dir .. "/u.db")
      core.run(function()
        local env = { PATH = os.getenv("PATH"), LUA_CPATH = build .. "/lib/?.so",
          LD_PRELOAD = ((os.getenv("LD_PRELOAD") or "") .. " " .. build .. "/fixtures/no_threads.so"),
          ASAN_OPTIONS = os.getenv("ASAN_OPTIONS") }
        local h = assert(core.proc.spawn { argv = { "lua5.4", "-e", helper }, env = env, stderr = "pipe" })
        local out = h.stdout:read(10000)
        local st = h:wait(10000)
        assert(st and st.code == 0, "the helper failed: " .. tostring(h.stderr:read(1000)))
        assert.are.equal("1 2 3 4 5\t5\t1\n", out)
      end)
    end)

    it("gives the connection to a transaction's holder alone until it ends", function()
      core.run(function()
        local log = {}
        local a = core.spawn(function()
          local r = conn:transaction(function()
            assert(conn:run("INSERT INTO t(who) VALUES ('a1')"))
            log[#log + 1] = "a1"
            core.sleep(20) -- b's insert is queued all this time
            assert(conn:run("INSERT INTO t(who) VALUES ('a2')"))
            log[#log + 1] = "a2"
            return "a"
          end)
          log[#log + 1] = "a committed"
          return r
        end)
        local b = core.spawn(function()
          assert(conn:run("INSERT INTO t(who) VALUES ('b')"))
          log[#log + 1] = "b"
        end)
        local c = core.spawn(function()
          -- a second transaction waits its turn, then runs whole
          conn:transaction(function()
            assert(conn:run("INSERT INTO t(who) VALUES ('c1')"))
            coroutine.yield()
            assert(conn:run("INSERT INTO t(who) VALUES ('c2')"))
          end)
          log[#log + 1] = "c committed"
        end)
        assert.are.same({ true, "a" }, { a:join() })
        assert.is_true((b:join()))
        assert.is_true((c:join()))
        assert.are.same({ "a1", "a2", "a committed", "b", "c committed" }, log)
        local rows = conn:query("SELECT who FROM t ORDER BY id")
        local who = {}
        for i, r in ipairs(rows) do who[i] = r.who end
        assert.are.same({ "a1", "a2", "b", "c1", "c2" }, who)
      end)
    end)

    it("does not block the loop while a statement waits", function()
      local other = assert(db.open(path))
      local slow = assert(db.open(path, { busy_timeout_ms = 150 }))
      assert(other:exec("BEGIN IMMEDIATE"))
      core.run(function()
        local ticks, waiting = 0, true
        local ticker = core.spawn(function()
          while waiting do core.sleep(5); ticks = ticks + 1 end
        end)
        local res, _, code = slow:run("INSERT INTO t(who) VALUES ('s')")
        waiting = false
        ticker:join()
        assert.is_nil(res)
        assert.are.equal("SQLITE_BUSY", code)
        assert.is_true(ticks >= 3, "the loop ran " .. ticks .. " times")
      end)
      other:exec("ROLLBACK")
      slow:close()
      other:close()
    end)

    it("refuses synchronous use while tasks use the connection", function()
      core.run(function()
        local holder = core.spawn(function()
          conn:transaction(function() core.sleep(10) end)
        end)
        coroutine.yield() -- the holder's BEGIN is now queued or running
        -- a plain coroutine is not a task: the call would run synchronously
        local ok, err = pcall(coroutine.wrap(function() return conn:query("SELECT 1") end))
        assert.is_false(ok)
        assert.matches("in use by tasks", err)
        assert.is_true((holder:join()))
      end)
    end)

    it("close waits for the work other tasks queued, then refuses more", function()
      core.run(function()
        local c2 = assert(db.open(path))
        local got = {}
        local tasks = {}
        for i = 1, 3 do
          tasks[i] = core.spawn(function()
            got[i] = c2:query([[WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n
              WHERE x < ?) SELECT count(*) AS k FROM n]], 20000 * i)
          end)
        end
        coroutine.yield() -- their queries are queued
        assert.is_true(c2:close())
        for i = 1, 3 do
          assert.are.equal(20000 * i, got[i][1].k)
          assert.is_true((tasks[i]:join()))
        end
        assert.has_error(function() c2:query("SELECT 1") end, "core.db: the connection is closed")
        assert.is_true(c2:close())
      end)
    end)

    it("a <close> or a close outside any task lets queued work finish first", function()
      core.run(function()
        local c2 = assert(db.open(path))
        local got
        local reader = core.spawn(function()
          got = c2:query("WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n "
            .. "WHERE x < 50000) SELECT count(*) AS k FROM n")
        end)
        coroutine.yield() -- the reader's query is on the thread pool
        do
          local _ <close> = c2 -- must not wait (a __close cannot), must not cut the query
        end
        assert.has_error(function() c2:query("SELECT 1") end, "core.db: the connection is closed")
        assert.is_true((reader:join()))
        assert.are.equal(50000, got[1].k)

        local c3 = assert(db.open(path))
        reader = core.spawn(function() got = c3:query("SELECT 7 AS k") end)
        coroutine.yield()
        -- a plain coroutine is no task: close returns at once, the close follows the query
        assert.is_true(coroutine.wrap(function() return c3:close() end)())
        assert.is_true((reader:join()))
        assert.are.equal(7, got[1].k)
        assert.are.equal("tenement.db.conn (closed)", tostring(c3))
      end)
    end)

    it("close from another task waits for a transaction in progress", function()
      core.run(function()
        local c2 = assert(db.open(path))
        local holder = core.spawn(function()
          return c2:transaction(function()
            assert(c2:run("INSERT INTO t(who) VALUES ('h1')"))
            core.sleep(10)
            assert(c2:run("INSERT INTO t(who) VALUES ('h2')"))
            return "committed"
          end)
        end)
        coroutine.yield()
        assert.is_true(c2:close())
        assert.are.same({ true, "committed" }, { holder:join() })
        assert.are.equal(2, conn:query("SELECT count(*) AS k FROM t")[1].k)
      end)
    end)

    it("a <close> while the holder is between two statements of its transaction waits for it", function()
      core.run(function()
        local c2 = assert(db.open(path))
        local inside = false
        local holder = core.spawn(function()
          return c2:transaction(function()
            assert(c2:run("INSERT INTO t(who) VALUES ('h1')"))
            inside = true
            core.park()
            assert(c2:run("INSERT INTO t(who) VALUES ('h2')"))
            return "committed"
          end)
        end)
        -- the holder is parked inside its transaction: nothing is queued or on the pool
        while not inside do core.sleep(1) end
        do
          local _ <close> = c2
        end
        assert.is_true(core.wake(holder))
        assert.are.same({ true, "committed" }, { holder:join() })
        assert.are.equal(2, conn:query("SELECT count(*) AS k FROM t")[1].k)
        assert.are.equal("tenement.db.conn (closed)", tostring(c2))
      end)
    end)

    it("ends with the task that errors while its query is queued", function()
      core.on_error(function() end) -- the failure is joined below, not reported
      finally(function() core.on_error(nil) end)
      core.run(function()
        local failing = core.spawn(function()
          assert(conn:run("INSERT INTO t(who) VALUES ('f')"))
          error("task failed after its write")
        end)
        local ok, err = failing:join()
        assert.is_nil(ok)
        assert.matches("task failed after its write", err)
        assert.are.equal(1, conn:query("SELECT count(*) AS k FROM t")[1].k)
      end)
    end)
  end)

  describe("FTS5", function()
    it("matches, highlights, snippets and orders by bm25", function()
      both(function(mode)
        local conn = assert(db.open(path))
        assert(conn:exec([[
          DROP TABLE IF EXISTS logs;
          CREATE VIRTUAL TABLE logs USING fts5(message, instance UNINDEXED);
        ]]))
        local ins = assert(conn:prepare("INSERT INTO logs(message, instance) VALUES (?, ?)"))
        assert.are.equal(4, ins:run_many({
          { "server started on port 8080", "api:1" },
          { "error: connection refused, error again", "api:2" },
          { "request served in 3 ms", "api:1" },
          { "an error happened", "web:1" },
        }))
        local rows = assert(conn:query([[
          SELECT instance, highlight(logs, 0, '[', ']') AS hl,
                 snippet(logs, 0, '<', '>', '...', 2) AS snip, bm25(logs) AS score
          FROM logs WHERE logs MATCH ? ORDER BY bm25(logs)]], "error"))
        assert.are.equal(2, #rows, mode)
        assert.are.equal("api:2", rows[1].instance)
        assert.are.equal("[error]: connection refused, [error] again", rows[1].hl)
        assert.are.equal("an [error] happened", rows[2].hl)
        assert.matches("<error>", rows[1].snip)
        assert.is_true(rows[1].score < rows[2].score)
        assert.are.equal("float", math.type(rows[1].score))
        rows = conn:query("SELECT instance FROM logs WHERE logs MATCH ? ORDER BY rank", "conn* OR serv*")
        assert.are.equal(3, #rows)
        local res, err, code = conn:query("SELECT * FROM logs WHERE logs MATCH ?", "AND AND")
        assert.is_nil(res)
        assert.matches("fts5: syntax error", err)
        assert.are.equal("SQLITE_ERROR", code)
        ins:close()
        conn:close()
      end)
    end)
  end)

  describe("durability", function()
    it("keeps a row written just before the writer is SIGKILLed", function()
      local conn = assert(db.open(path))
      assert(conn:exec("CREATE TABLE t(v TEXT)"))
      conn:close()
      local script = dir .. "/writer.lua"
      local f = assert(io.open(script, "w"))
      f:write(string.format("package.cpath = %q\n", package.cpath), [[
        local core = require "tenement.core"
        local path, mode = arg[1], arg[2]
        local pid = io.open("/proc/self/stat"):read("l"):match("^(%d+)")
        local conn = assert(core.db.open(path))
        if mode == "sync" then
          assert(conn:run("INSERT INTO t(v) VALUES (?)", mode))
          os.execute("kill -KILL " .. pid)
        else
          core.run(function()
            assert(conn:run("INSERT INTO t(v) VALUES (?)", mode))
            os.execute("kill -KILL " .. pid)
          end)
        end
        os.exit(3)
      ]])
      f:close()
      for _, mode in ipairs({ "sync", "task" }) do
        local ok, how, code = os.execute(string.format("exec lua5.4 %q %q %q", script, path, mode))
        assert.is_nil(ok)
        assert.are.same({ "signal", 9 }, { how, code })
        -- killed before any close: the row lives only in the log
        assert.is_true(size(path .. "-wal") > 0)
        local r = assert(db.open(path))
        local rows = r:query("SELECT v FROM t WHERE v = ?", mode)
        assert.are.equal(1, #rows, mode)
        r:close()
      end
    end)
  end)

  describe("benchmark", function()
    if not os.getenv("TN_BENCH") then
      pending("run_many into FTS5: set TN_BENCH=1 to measure (prints lines/s)")
      return
    end
    it("indexes log lines with run_many into FTS5", function()
      local conn = assert(db.open(path))
      assert(conn:exec("CREATE VIRTUAL TABLE logs USING fts5(message, instance UNINDEXED, ts UNINDEXED)"))
      local ins = assert(conn:prepare("INSERT INTO logs(message, instance, ts) VALUES (?, ?, ?)"))
      local words = { "GET", "POST", "/api/v1/items", "200", "404", "served", "in", "ms", "user",
        "request", "error", "connection", "timeout", "cache", "hit", "miss", "worker", "started" }
      local batches, per = 100, 1000
      local lines = {}
      for b = 1, batches do
        local rows = {}
        for i = 1, per do
          local msg = {}
          for w = 1, 12 do msg[w] = words[(b * 7 + i * 13 + w * 5) % #words + 1] end
          rows[i] = { table.concat(msg, " ") .. " id=" .. (b * per + i), "api:" .. (i % 4), b * per + i }
        end
        lines[b] = rows
      end
      core.run(function()
        local t0 = core.hrtime()
        for b = 1, batches do assert.are.equal(per, ins:run_many(lines[b])) end
        local secs = (core.hrtime() - t0) / 1e9
        print(string.format("\nrun_many FTS5: %d lines in %.3f s = %.0f lines/s (batches of %d)",
          batches * per, secs, batches * per / secs, per))
        t0 = core.hrtime()
        local single = assert(conn:prepare("INSERT INTO logs(message, instance, ts) VALUES (?, ?, ?)"))
        for i = 1, 200 do assert(single:run(lines[1][i][1], "x", i)) end
        secs = (core.hrtime() - t0) / 1e9
        print(string.format("single-row commits (synchronous=FULL): %.0f/s", 200 / secs))
        single:close()
      end)
      ins:close()
      conn:close()
    end)
  end)
end)

describe("core.db.tokens", function()
  it("gives the tokens the log index makes of a text: lower case, no diacritics, no punctuation", function()
    assert.are.same({ "hello", "world", "42" }, db.tokens("Hello, Wörld — 42!"))
    assert.are.same({ "ошибка", "диск" }, db.tokens("Ошибка: диск"))
    -- punctuation of any script gives none: such a word matches no line
    for _, word in ipairs { "=", "->", "—", "«»", "→", "…", "" } do
      assert.are.same({}, db.tokens(word), word)
    end
    -- a NUL is a separator, not the end of the text
    assert.are.same({ "a", "b" }, db.tokens("a\0b"))
    -- with spans, where each token lies (string.sub positions, in bytes)
    local tokens, spans = db.tokens("Hello, Wörld \0x", true)
    assert.are.same({ "hello", "world", "x" }, tokens)
    assert.are.same({ 1, 5, 8, 13, 16, 16 }, spans)
    assert.has_error(function() db.tokens(nil) end)
  end)
end)
