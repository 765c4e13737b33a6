-- The durable store: {data_dir}/tenement.db (SQLite, WAL). The only module
-- that writes SQL. The schema changes only by appending a migration.
local core = require "tenement.core"
local sync = require "tenement.sync"

local store = {}

-- Each entry runs once, in order, inside a transaction; the number of the
-- last one applied is PRAGMA user_version.
store.migrations = {
  -- 1: instances that should run, and the logs with their full-text index
  [[
  CREATE TABLE instances (
    service    TEXT NOT NULL,
    id         TEXT NOT NULL,
    desired    INTEGER NOT NULL DEFAULT 1,
    weight     INTEGER NOT NULL DEFAULT 100,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (service, id)
  ) WITHOUT ROWID;

  CREATE TABLE log_lines (
    seq      INTEGER PRIMARY KEY,
    ts       REAL NOT NULL,
    instance TEXT NOT NULL,
    stream   TEXT NOT NULL,
    message  TEXT NOT NULL
  );
  CREATE INDEX log_lines_by_instance ON log_lines (instance, seq);
  CREATE INDEX log_lines_by_time ON log_lines (ts);

  CREATE VIRTUAL TABLE log_search USING fts5 (
    message, content = 'log_lines', content_rowid = 'seq', tokenize = 'unicode61'
  );
  CREATE TRIGGER log_lines_indexed AFTER INSERT ON log_lines BEGIN
    INSERT INTO log_search (rowid, message) VALUES (new.seq, new.message);
  END;
  CREATE TRIGGER log_lines_unindexed AFTER DELETE ON log_lines BEGIN
    INSERT INTO log_search (log_search, rowid, message) VALUES ('delete', old.seq, old.message);
  END;
  ]],
  -- 2: API tokens, only their hashes
  [[
  CREATE TABLE tokens (
    name        TEXT PRIMARY KEY,
    prefix      TEXT NOT NULL UNIQUE,
    hash        BLOB NOT NULL,
    tenant      TEXT,
    description TEXT,
    created_at  REAL NOT NULL,
    last_used   REAL
  );
  ]],
  -- 3: the full-text index is fed by append_logs, one statement per batch,
  -- instead of by a trigger per line: FTS5 flushed what a statement gave it
  -- as a segment of its own, so a line at a time made a segment a line and
  -- merged them over and over (indexing ran about 3x slower)
  [[
  DROP TRIGGER log_lines_indexed;
  ]],
  -- 4: the last seq given, kept apart from the lines: a seq is INTEGER
  -- PRIMARY KEY, one more than the largest held, so once pruning took every
  -- line the seqs began again at 1, under the cursor of every reader
  [[
  CREATE TABLE log_seq (one INTEGER PRIMARY KEY CHECK (one = 1), last INTEGER NOT NULL);
  INSERT INTO log_seq (one, last) SELECT 1, coalesce(max(seq), 0) FROM log_lines;
  ]],
  -- 5: the pid of the process that wrote each line: during a rollout or a
  -- restart two processes of one instance write side by side. NULL for the
  -- lines stored before it, and for those of no process
  [[
  ALTER TABLE log_lines ADD COLUMN pid INTEGER;
  ]],
  -- 6: the index reads lines with their terminal escapes blanked (core.db's
  -- no_escapes tokenizer): "\27[31merror" was indexed as the word "31merror",
  -- and a search for error missed every coloured line. Rebuilt from the
  -- lines, which keep their bytes.
  [[
  DROP TABLE log_search;
  CREATE VIRTUAL TABLE log_search USING fts5 (
    message, content = 'log_lines', content_rowid = 'seq', tokenize = 'no_escapes unicode61'
  );
  INSERT INTO log_search (log_search) VALUES ('rebuild');
  ]],
}

local Store = {}
Store.__index = Store

-- store.open(path) -> store | nil, err
function store.open(path)
  local conn, err = core.db.open(path)
  if not conn then return nil, err end
  local self = setmetatable({ conn = conn, path = path }, Store)
  local ok, merr = self:migrate()
  if not ok then
    conn:close()
    return nil, merr
  end
  return self
end

function Store:migrate()
  local rows, err = self.conn:query("PRAGMA user_version")
  if not rows then return nil, err end
  local version = rows[1].user_version
  if version > #store.migrations then
    return nil, string.format("%s was written by a newer ten (schema %d, this one knows %d): "
      .. "upgrade ten or restore an older store", self.path, version, #store.migrations)
  end
  if version > 0 and version < #store.migrations then
    -- a migration may rebuild the log index: a minute for millions of lines
    require("tenement.log").info("%s: updating the store from schema %d to %d", self.path, version,
      #store.migrations)
  end
  for v = version + 1, #store.migrations do
    local ok, merr = self.conn:transaction(function()
      local ok, e = self.conn:exec(store.migrations[v])
      if not ok then return nil, e end
      return self.conn:exec("PRAGMA user_version = " .. v)
    end)
    if not ok then return nil, string.format("%s: migration %d failed: %s", self.path, v, merr) end
  end
  return true
end

function Store:close()
  if self.conn then self.conn:close() end
  self.conn = nil
end

-- instances --------------------------------------------------------------

local SET_DESIRED = [[
  INSERT INTO instances (service, id, desired, created_at, updated_at) VALUES (?, ?, ?, ?, ?)
  ON CONFLICT (service, id) DO UPDATE SET desired = excluded.desired, updated_at = excluded.updated_at
]]

-- Remembers whether service:id should run, so a restarted server brings it
-- back. -> true once the row is durable | nil, err, code. Writes that arrive
-- while one is on its way are committed together, in the order they came,
-- by the next transaction: a thousand instances started at once cost a few
-- disk syncs, not a thousand queued ones.
function Store:set_desired(service, id, desired)
  if not core.current() then
    local now = core.time()
    local ok, err, code = self.conn:run(SET_DESIRED, service, id, desired and 1 or 0, now, now)
    if not ok then return nil, err, code end
    return true
  end
  return self:set_desired_all({ { service = service, id = id } }, desired)
end

-- set_desired of every {service =, id =} of list, in one transaction. In a
-- task. -> true once the rows are durable | nil, err, code
function Store:set_desired_all(list, desired)
  local now = core.time()
  local group = self.desired_group
  if not group then
    group = { rows = {}, done = sync.event() }
    self.desired_group = group
    if not self.desired_writer then
      self.desired_writer = core.spawn(self.write_desired, self)
    end
  end
  for _, inst in ipairs(list) do
    group.rows[#group.rows + 1] = { inst.service, inst.id, desired and 1 or 0, now, now }
  end
  return group.done:wait()
end

-- The task writing the groups of set_desired, while there are any.
function Store:write_desired()
  while self.desired_group do
    local group = self.desired_group
    self.desired_group = nil
    local ok, err, code
    if not self.conn then
      err, code = "the store is closed", "SQLITE_MISUSE"
    elseif not self.upsert_desired then
      self.upsert_desired, err, code = self.conn:prepare(SET_DESIRED)
    end
    if self.upsert_desired and self.conn then ok, err, code = self.upsert_desired:run_many(group.rows) end
    if ok then group.done:set(true) else group.done:set(nil, err, code) end
  end
  self.desired_writer = nil
end

function Store:set_weight(service, id, weight)
  local now = core.time()
  return self.conn:run([[
    INSERT INTO instances (service, id, desired, weight, created_at, updated_at) VALUES (?, ?, 0, ?, ?, ?)
    ON CONFLICT (service, id) DO UPDATE SET weight = excluded.weight, updated_at = excluded.updated_at
  ]], service, id, weight, now, now)
end

function Store:forget(service, id)
  return self.conn:run("DELETE FROM instances WHERE service = ? AND id = ?", service, id)
end

-- -> { {service=, id=, desired=bool, weight=n}, ... }
function Store:instances()
  local rows, err = self.conn:query("SELECT service, id, desired, weight FROM instances ORDER BY created_at, service, id")
  if not rows then return nil, err end
  for _, r in ipairs(rows) do r.desired = r.desired == 1 end
  return rows
end

-- tokens -----------------------------------------------------------------

-- -> true | nil, err, code ("conflict" when the name exists)
function Store:token_create(name, prefix, hash, tenant, description)
  local ok, err, code = self.conn:run(
    "INSERT INTO tokens (name, prefix, hash, tenant, description, created_at) VALUES (?, ?, ?, ?, ?, ?)",
    name, prefix, core.db.blob(hash), tenant, description, core.time())
  if not ok then
    if code == "SQLITE_CONSTRAINT" and err:find("tokens.name", 1, true) then
      return nil, "a token named " .. name .. " exists already", "conflict"
    end
    return nil, err, code
  end
  return true
end

function Store:token_by_prefix(prefix)
  local rows = self.conn:query("SELECT name, hash, tenant FROM tokens WHERE prefix = ?", prefix)
  return rows and rows[1]
end

function Store:token_used(name)
  return self.conn:run("UPDATE tokens SET last_used = ? WHERE name = ?", core.time(), name)
end

function Store:tokens()
  return self.conn:query("SELECT name, prefix, tenant, description, created_at, last_used FROM tokens ORDER BY created_at")
end

function Store:token_count()
  local rows = self.conn:query("SELECT count(*) AS n FROM tokens")
  return rows and rows[1].n or 0
end

-- -> true | nil, err, "not_found"
function Store:token_revoke(name)
  local res, err = self.conn:run("DELETE FROM tokens WHERE name = ?", name)
  if not res then return nil, err end
  if res.changes == 0 then
    return nil, "no token named " .. name .. " (a revoked one is gone; `ten token-list` shows those there are)",
      "not_found"
  end
  return true
end

-- logs -------------------------------------------------------------------

-- Appends a batch from core.logbuf's sink: { {ts, instance, stream, text [, pid]}, ... }
-- (each row gets its seq as a 6th value) -> lines written | nil, err, code.
-- One transaction: the lines, then their full-text entries in one statement
-- (FTS5 indexes a statement's rows as one segment).
function Store:append_logs(batch)
  if #batch == 0 then return 0 end
  -- the writer may still hold a batch when the server closes the store
  if not self.conn then return nil, "the store is closed", "SQLITE_MISUSE" end
  if not self.insert_log then
    local stmt, err, code = self.conn:prepare(
      "INSERT INTO log_lines (ts, instance, stream, message, pid, seq) VALUES (?, ?, ?, ?, ?, ?)")
    if not stmt then return nil, err, code end
    self.insert_log = stmt
  end
  return self.conn:transaction(function(conn)
    local rows, err, code = conn:query(
      "SELECT max(coalesce((SELECT max(seq) FROM log_lines), 0), coalesce((SELECT last FROM log_seq), 0)) AS last")
    if not rows then return nil, err, code end
    local last = rows[1].last
    for i, row in ipairs(batch) do row[6] = last + i end
    local n
    n, err, code = self.insert_log:run_many(batch)
    if not n then return nil, err, code end
    local ok
    ok, err, code = conn:run("INSERT OR REPLACE INTO log_seq (one, last) VALUES (1, ?)", last + #batch)
    if not ok then return nil, err, code end
    ok, err, code = conn:run("INSERT INTO log_search (rowid, message) SELECT seq, message FROM log_lines WHERE seq > ?",
      last)
    if not ok then return nil, err, code end
    return n
  end)
end

-- FTS5's time grows with the square of a query's terms (4000, which fit in
-- a request head, took seconds of the store's only connection), and a search
-- of people's words needs few.
store.MAX_QUERY_WORDS = 32

-- Turns free text into an FTS5 query that cannot be a syntax error: each
-- word becomes a quoted term (prefix match for the last), all must match.
-- A NUL separates words: FTS5 reads the query as a C string, so one inside a
-- quoted term left it unterminated, and the tokenizer splits lines there too.
-- A word of punctuation only ("=", "->", "—", "«»") has no token in the index
-- and its empty phrase matches no line: it is left out, unless nothing else
-- is. The index's own tokenizer says which words those are (core.db.tokens):
-- what counts as a letter is Unicode's business, not a pattern's.
-- -> words searched, their tokens | nil (no words) | nil, err (too many)
local function search_words(text)
  local words = {}
  for word in tostring(text):gsub("\0", " "):gmatch("%S+") do words[#words + 1] = word end
  if #words == 0 then return nil end
  if #words > store.MAX_QUERY_WORDS then
    return nil, string.format("q has %d words, at most %d are searched", #words, store.MAX_QUERY_WORDS)
  end
  local kept, kept_tokens, tokens = {}, {}, {}
  for i, word in ipairs(words) do
    tokens[i] = core.db.tokens(word)
    if #tokens[i] > 0 then kept[#kept + 1], kept_tokens[#kept + 1] = word, tokens[i] end
  end
  if #kept == 0 then return words, tokens end
  return kept, kept_tokens
end

-- -> query | nil (no words) | nil, err (too many)
function store.fts_query(text)
  local words, err = search_words(text)
  if not words then return nil, err end
  local terms = {}
  for i, word in ipairs(words) do terms[i] = '"' .. word:gsub('"', '""') .. '"' end
  terms[#terms] = terms[#terms] .. "*"
  return table.concat(terms, " AND ")
end

-- Whether the tokens of doc from `at` on are phrase's (its last one as a
-- prefix of doc's when `prefix`).
local function phrase_at(doc, at, phrase, prefix)
  if #phrase == 0 or at + #phrase - 1 > #doc then return false end
  for k, want in ipairs(phrase) do
    local got = doc[at + k - 1]
    if prefix and k == #phrase then
      if got:sub(1, #want) ~= want then return false end
    elseif got ~= want then
      return false
    end
  end
  return true
end

-- FTS5's highlight() for the query store.fts_query(text) makes, done here
-- for lines holding a NUL: highlight() appends each piece between marks as a
-- C string, so the bytes from a NUL to the next mark vanished. Each word is
-- a phrase of its tokens, the last word's last token a prefix; each match
-- is marked from its first token's first byte to its last token's last,
-- overlapping marks as one.
function store.highlight(message, text)
  local _, phrases = search_words(text)
  if not phrases then return message end
  local doc, spans = core.db.tokens(message, true)
  local marks = {}
  for at = 1, #doc do
    for p, phrase in ipairs(phrases) do
      if phrase_at(doc, at, phrase, p == #phrases) then
        marks[#marks + 1] = { spans[2 * at - 1], spans[2 * (at + #phrase - 1)] }
      end
    end
  end
  table.sort(marks, function(a, b) return a[1] < b[1] end)
  local merged = {}
  for _, m in ipairs(marks) do
    local last = merged[#merged]
    if last and m[1] <= last[2] then last[2] = math.max(last[2], m[2])
    else merged[#merged + 1] = m end
  end
  local out, from = {}, 1
  for _, m in ipairs(merged) do
    out[#out + 1] = message:sub(from, m[1] - 1) .. "[" .. message:sub(m[1], m[2]) .. "]"
    from = m[2] + 1
  end
  out[#out + 1] = message:sub(from)
  return table.concat(out)
end

-- Store:logs{ instance=, service=, q=, stream=, since= (epoch s), after= (seq), limit=,
-- max_bytes= } -> rows newest first: {seq, ts, instance, stream, pid?, message,
-- highlighted?}; the newest `limit`, or with `after` the first `limit` past it,
-- fewer when their messages would pass max_bytes (then rows.capped)
function Store:logs(f)
  local where, binds = {}, {}
  -- a whole number: SQLite refuses LIMIT 2.5 as a datatype mismatch
  local limit = math.floor(math.max(1, math.min(tonumber(f.limit) or 100, 10000)))
  if f.instance then where[#where + 1] = "l.instance = ?"; binds[#binds + 1] = f.instance end
  if f.service then
    -- "svc:" up to "svc;" (';' follows ':'): every id of the service, by the index
    where[#where + 1] = "l.instance >= ?"; binds[#binds + 1] = f.service .. ":"
    where[#where + 1] = "l.instance < ?"; binds[#binds + 1] = f.service .. ";"
  end
  if f.stream then where[#where + 1] = "l.stream = ?"; binds[#binds + 1] = f.stream end
  if f.since then where[#where + 1] = "l.ts >= ?"; binds[#binds + 1] = f.since end
  if f.after then where[#where + 1] = "l.seq > ?"; binds[#binds + 1] = f.after end
  local q, qerr
  if f.q then
    q, qerr = store.fts_query(f.q)
    if qerr then return nil, qerr end
  end
  local from
  if q then
    -- walk the full-text matches newest first and filter them; the unary +
    -- keeps SQLite from driving the search by the instance index and
    -- probing the full-text index for every line of that instance
    for i, w in ipairs(where) do where[i] = w:gsub("^l%.", "+l.") end
    table.insert(where, 1, "log_search MATCH ?")
    table.insert(binds, 1, q)
    from = " FROM log_search JOIN log_lines l ON l.seq = log_search.rowid"
  else
    from = " FROM log_lines l"
  end
  -- after a seq, the first lines past it: the newest ones would leave a gap
  -- between it and them that a reader paging forward (the event stream,
  -- `ten logs -f`) never sees
  local order = (q and " ORDER BY log_search.rowid" or " ORDER BY l.seq") .. (f.after and " ASC" or " DESC")
  local function select(columns, n, extra, extra_bind)
    local w, b = where, binds
    if extra then
      w, b = { table.unpack(where) }, { table.unpack(binds) }
      w[#w + 1], b[#b + 1] = extra, extra_bind
    end
    local sql = "SELECT " .. columns .. from
    if #w > 0 then sql = sql .. " WHERE " .. table.concat(w, " AND ") end
    return self.conn:query(sql .. order .. " LIMIT " .. n, table.unpack(b))
  end
  -- A line may hold 16 KiB: ten thousand of them were 160 MB to copy and
  -- encode on the loop. Past the default limit the sizes are read first
  -- (not the text) and the answer stops before max_bytes.
  local capped, bound, bound_seq
  if f.max_bytes and limit > 100 then
    local sizes, err, code = select("l.seq AS seq, length(CAST(l.message AS BLOB)) AS n", limit)
    if not sizes then return nil, err, code end
    local total = 0
    for i, r in ipairs(sizes) do
      total = total + r.n
      if total > f.max_bytes and i > 1 then
        limit, capped = i - 1, true
        break
      end
    end
    -- newest first, lines written since would come before those measured
    if capped and not f.after then bound, bound_seq = (q and "+" or "") .. "l.seq <= ?", sizes[1].seq end
  end
  local rows, err, code = select("l.seq, l.ts, l.instance, l.stream, l.pid, l.message"
    .. (q and ", highlight(log_search, 0, '[', ']') AS highlighted" or ""), limit, bound, bound_seq)
  if rows and f.after then
    for i = 1, #rows // 2 do rows[i], rows[#rows + 1 - i] = rows[#rows + 1 - i], rows[i] end
  end
  if rows and q then
    for _, r in ipairs(rows) do
      if r.message:find("\0", 1, true) then r.highlighted = store.highlight(r.message, f.q) end
    end
  end
  if rows then rows.capped = capped end
  return rows, err, code
end

-- Store:prune_logs{ max_age =, max_lines = [, max_bytes =] [, chunk =] }
-- -> true, more | nil, err. Retention: lines older than max_age seconds go,
-- and past max_lines (or past max_bytes of text) the oldest lines of the
-- instance holding the most, so an app flooding its output erases its own
-- lines and not its neighbours'. more is true while lines past a bound are
-- left. Every statement takes at most `chunk` lines: a statement holds the
-- connection, and every reader queued behind it, while it runs, and one
-- DELETE of a flood's millions of lines (each taken out of the index by a
-- trigger) held `ten logs` for minutes.
function Store:prune_logs(bounds)
  local chunk, max_lines = bounds.chunk or 5000, bounds.max_lines
  local cutoff = core.time() - bounds.max_age
  local ok, err = self.conn:run(
    "DELETE FROM log_lines WHERE seq IN (SELECT seq FROM log_lines WHERE ts < ? ORDER BY ts LIMIT ?)", cutoff, chunk)
  if not ok then return nil, err end
  local aged
  aged, err = self.conn:query("SELECT seq FROM log_lines WHERE ts < ? LIMIT 1", cutoff)
  if not aged then return nil, err end
  local more = aged[1] ~= nil
  -- the count of each instance's lines, by the (instance, seq) index
  local counts
  counts, err = self.conn:query("SELECT instance, count(*) AS n FROM log_lines GROUP BY instance")
  if not counts then return nil, err end
  local total = 0
  for _, c in ipairs(counts) do total = total + c.n end
  -- bytes as lines: at the size of the newest lines (16 KiB lines of a flood
  -- made a million lines 16 GB); summing every line's length would read them
  -- all, and the file's own size lags behind what pruning frees in the index
  if bounds.max_bytes and total > 0 then
    local recent
    recent, err = self.conn:query("SELECT avg(length(CAST(message AS BLOB))) AS size FROM "
      .. "(SELECT message FROM log_lines ORDER BY seq DESC LIMIT 10000)")
    if not recent then return nil, err end
    local size = recent[1].size
    if size and size > 0 then max_lines = math.min(max_lines, math.max(1, math.floor(bounds.max_bytes / size))) end
  end
  local over = total - max_lines
  if over <= 0 then return true, more end
  -- the biggest come down to one level, the lowest that leaves max_lines:
  -- the top k are cut to `level` where that is no lower than the next one
  table.sort(counts, function(a, b) return a.n > b.n end)
  local k, sum, level = 0, 0, 0
  repeat
    k = k + 1
    sum = sum + counts[k].n
    level = (sum - over) // k
  until level >= (counts[k + 1] and counts[k + 1].n or 0)
  for i = 1, k do
    local take = counts[i].n - level
    while take > 0 do
      local n = math.min(take, chunk)
      ok, err = self.conn:run("DELETE FROM log_lines WHERE seq IN (SELECT seq FROM log_lines WHERE instance = ? "
        .. "ORDER BY seq LIMIT ?)", counts[i].instance, n)
      if not ok then return nil, err end
      take = take - n
    end
  end
  return true, more
end

return store
