-- cgroups for instances: where limits can be enforced on this host, one
-- cgroup per instance in each hierarchy it needs, the limits written there,
-- usage read back, and every process of an instance found and killed.
--
-- Hosts come in three shapes: the unified cgroup2 hierarchy alone, the v1
-- hierarchies alone (one per controller or group of controllers), or both
-- ("hybrid": v1 controllers plus a cgroup2 hierarchy that holds whatever
-- controllers v1 did not take, often none). A controller is active in one
-- hierarchy at most, so for each limit there is at most one place to put it.
--
-- Instance cgroups go beneath the cgroup `ten` itself runs in, in every
-- hierarchy (<own cgroup>/tenement/<name>), never at a hierarchy's root: no
-- process ever leaves the limits that were given to `ten`.
--
-- cgroupfs reads and writes are in-memory kernel operations, quick enough
-- for the loop thread. Waiting for processes to die is not: kill_all,
-- remove and cleanup_stale sleep between checks, so they run in a task.
local core = require "tenement.core"

local cgroup = {}

cgroup.BASE = "tenement"
-- The leaf of its own cgroup that ten moves into in cgroup2 (see ensure_base).
cgroup.LEAF = "tenement-server"

-- The kinds of limit an instance may ask for, and the controller of each.
cgroup.KINDS = { "memory", "cpu", "pids" }

local V1_CONTROLLERS = {
  cpu = true, cpuacct = true, cpuset = true, memory = true, devices = true, freezer = true,
  net_cls = true, blkio = true, perf_event = true, net_prio = true, hugetlb = true, pids = true,
  rdma = true, misc = true,
}

local CPU_WEIGHT_MIN, CPU_WEIGHT_MAX = 1, 10000
local V1_SHARES_MIN, V1_SHARES_MAX = 2, 262144
local DIR_MODE = 493 -- 0755 (Lua has no octal literals)
local KILL_TIMEOUT_MS = 5000
local REMOVE_TIMEOUT_MS = 2000

---------------------------------------------------------------------------
-- parsing

-- mountinfo escapes space, tab, newline and backslash as \ooo
local function unescape(s)
  return (s:gsub("\\(%d%d%d)", function(o) return string.char(tonumber(o, 8)) end))
end

-- -> list of { root, point, fstype, source, super = { option = value|true } }
function cgroup.parse_mountinfo(text)
  local mounts = {}
  for line in text:gmatch("[^\n]+") do
    local pre, post = line:match("^(.-) %- (.*)$")
    if pre then
      local f, g = {}, {}
      for w in pre:gmatch("%S+") do f[#f + 1] = w end
      for w in post:gmatch("%S+") do g[#g + 1] = w end
      if f[5] and g[1] then
        local super = {}
        for opt in (g[3] or ""):gmatch("[^,]+") do
          local k, v = opt:match("^([^=]+)=(.*)$")
          if k then super[k] = v else super[opt] = true end
        end
        mounts[#mounts + 1] = { root = unescape(f[4]), point = unescape(f[5]), fstype = g[1],
          source = g[2] and unescape(g[2]), super = super }
      end
    end
  end
  return mounts
end

-- /proc/PID/cgroup -> list of { id, controllers = {names}, path }
function cgroup.parse_proc_cgroup(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    local id, ctrls, path = line:match("^(%d+):([^:]*):(.*)$")
    if id then
      local list = {}
      for c in ctrls:gmatch("[^,]+") do list[#list + 1] = c end
      out[#out + 1] = { id = tonumber(id), controllers = list, path = path }
    end
  end
  return out
end

local function sorted_keys(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

-- The key of a v1 hierarchy: its controllers (and name=), sorted.
local function v1_key(names)
  local l = {}
  for _, n in ipairs(names) do l[#l + 1] = n end
  table.sort(l)
  return table.concat(l, ",")
end

local function join(dir, rel)
  if rel == "" or rel == "/" then return dir end
  if dir:sub(-1) == "/" then dir = dir:sub(1, -2) end
  if rel:sub(1, 1) ~= "/" then rel = "/" .. rel end
  return dir .. rel
end

-- Where the cgroup at `path` (as /proc/self/cgroup names it) appears under
-- a mount of its hierarchy whose root is `root`. -> dir | nil, why
local function locate(mount, path)
  local root = mount.root
  if root == "/" then return join(mount.point, path) end
  if path == root then return mount.point end
  if path:sub(1, #root + 1) == root .. "/" then return join(mount.point, path:sub(#root + 1)) end
  return nil, string.format("ten's cgroup %s is outside the part of the hierarchy mounted at %s (%s)",
    path, mount.point, root)
end

---------------------------------------------------------------------------
-- detect

-- Can ten create cgroups in dir? -> true | nil, why
local function check_writable(fs, dir)
  local st, err = fs.stat(dir)
  if not st then return nil, err end
  if st.type ~= "directory" then return nil, dir .. " is not a directory" end
  local ok, aerr, code = fs.access(dir, "w")
  if not ok then
    if code == "EACCES" or code == "EPERM" or code == "EROFS" then
      return nil, string.format("cannot create cgroups in %s (%s): run ten as root, or delegate " ..
        "that cgroup to ten's user (systemd: Delegate=yes)", dir, code)
    end
    return nil, aerr
  end
  return true
end

-- cgroup.detect([opts]) -> layout
--   opts.base:        directory under ten's own cgroup for instance cgroups (default "tenement")
--   opts.disable:     { memory = true, ... } controllers to act as if absent
--   opts.cgroup_file, opts.mountinfo_file: read instead of /proc/self/... (specs)
--   opts.fs:          replacement for core.fs (specs: a fake cgroupfs in a temp dir)
-- layout.kinds[kind] = { hier = h, version = 1|2, dir = base dir } or { reason = "..." }
-- layout.track: the hierarchy in which every instance gets a cgroup (to find
-- and kill all its processes), or nil with layout.track_reason.
function cgroup.detect(opts)
  opts = opts or {}
  local fs = opts.fs or core.fs
  local base = opts.base or cgroup.BASE
  assert(type(base) == "string" and base ~= "" and not base:find("^/") and not base:find("%.%."),
    "cgroup.detect: opts.base must be a relative path")
  local disable = opts.disable or {}
  local layout = { fs = fs, base = base, hierarchies = {}, kinds = {}, errors = {} }

  local cg_text, cerr = fs.read(opts.cgroup_file or "/proc/self/cgroup")
  local mi_text, merr = fs.read(opts.mountinfo_file or "/proc/self/mountinfo")
  if not cg_text or not mi_text then
    local why = "cannot read " .. (cg_text and merr or cerr)
    layout.errors[#layout.errors + 1] = why
    for _, kind in ipairs(cgroup.KINDS) do layout.kinds[kind] = { reason = why } end
    layout.track_reason = why
    return layout
  end
  local mine = cgroup.parse_proc_cgroup(cg_text)
  local mounts = cgroup.parse_mountinfo(mi_text)

  -- ten's cgroup path in each hierarchy: "" -> v2, else the v1 key
  local own_path = {}
  for _, e in ipairs(mine) do
    if e.id == 0 and #e.controllers == 0 then own_path[""] = e.path
    else own_path[v1_key(e.controllers)] = e.path end
  end

  local seen = {}
  for _, m in ipairs(mounts) do
    local h
    if m.fstype == "cgroup2" and not seen[""] and own_path[""] then
      -- a ten that re-executed itself after moving into its leaf: the
      -- cgroup it was given is the leaf's parent
      local path = own_path[""]:gsub("/" .. cgroup.LEAF:gsub("%p", "%%%0") .. "$", "")
      h = { version = 2, key = "", mount = m.point, path = path ~= "" and path or "/", controllers = {} }
    elseif m.fstype == "cgroup" then
      local names = {}
      for opt in pairs(m.super) do
        if V1_CONTROLLERS[opt] then names[#names + 1] = opt end
      end
      if m.super.name then names[#names + 1] = "name=" .. m.super.name end
      local key = v1_key(names)
      if #names > 0 and not seen[key] and own_path[key] then
        local ctrls = {}
        for _, n in ipairs(names) do if V1_CONTROLLERS[n] then ctrls[n] = true end end
        h = { version = 1, key = key, mount = m.point, path = own_path[key], controllers = ctrls }
      end
    end
    if h then
      local own, why = locate(m, h.path)
      if own then
        h.own = own
        h.base = join(own, base)
        local ok, werr = check_writable(fs, own)
        if not ok then h.reason = werr end
      else
        h.reason = why
      end
      if h.version == 2 and h.own then
        local text = fs.read(join(h.own, "cgroup.controllers"))
        for c in (text or ""):gmatch("%S+") do h.controllers[c] = true end
      end
      seen[h.key] = true
      layout.hierarchies[#layout.hierarchies + 1] = h
      if h.version == 2 then layout.v2 = h end
    end
  end

  local function v1_with(ctrl)
    for _, h in ipairs(layout.hierarchies) do
      if h.version == 1 and h.controllers[ctrl] then return h end
    end
  end

  for _, kind in ipairs(cgroup.KINDS) do
    local v2, v1 = layout.v2, v1_with(kind)
    local entry
    if disable[kind] then
      entry = { reason = kind .. " controller disabled by the caller" }
    elseif v2 and v2.controllers[kind] and not v2.reason then
      entry = { hier = v2, version = 2 }
    elseif v1 and not v1.reason then
      entry = { hier = v1, version = 1 }
    else
      local parts = {}
      if not v2 then
        parts[#parts + 1] = "no cgroup2 hierarchy mounted"
      elseif v2.reason then
        parts[#parts + 1] = "the cgroup2 hierarchy at " .. v2.mount .. " is unusable: " .. v2.reason
      else
        local offered = sorted_keys(v2.controllers)
        parts[#parts + 1] = string.format("no %s controller in the cgroup2 hierarchy at %s " ..
          "(ten's cgroup %s offers: %s)", kind, v2.mount, v2.path,
          #offered > 0 and table.concat(offered, " ") or "none")
      end
      if not v1 then
        parts[#parts + 1] = "no v1 " .. kind .. " hierarchy mounted"
      else
        parts[#parts + 1] = "the v1 " .. kind .. " hierarchy at " .. v1.mount .. " is unusable: " .. v1.reason
      end
      entry = { reason = table.concat(parts, " and ") }
    end
    layout.kinds[kind] = entry
  end

  -- Where every instance gets a cgroup, limits or not: cgroup2 (it has
  -- cgroup.kill and cpu.stat everywhere), else a v1 hierarchy that exists
  -- for this purpose as much as any.
  if layout.v2 and not layout.v2.reason then
    layout.track = layout.v2
  else
    for _, c in ipairs({ "pids", "memory", "cpuacct", "cpu", "freezer" }) do
      local h = v1_with(c)
      if h and not h.reason and not disable[c] then layout.track = h break end
    end
    if not layout.track then
      layout.track_reason = layout.v2 and layout.v2.reason and
        ("the cgroup2 hierarchy is unusable: " .. layout.v2.reason) or
        "no usable cgroup hierarchy (neither cgroup2 nor v1 pids, memory, cpuacct, cpu or freezer)"
    end
  end
  -- CPU time of an instance: cgroup2's cpu.stat when it tracks, else cpuacct.
  if not (layout.track and layout.track.version == 2) then
    local h = v1_with("cpuacct")
    if h and not h.reason then layout.cpuacct = h end
  end
  return layout
end

-- cgroup.describe(layout) -> lines for the startup log
function cgroup.describe(layout)
  local lines = {}
  for _, h in ipairs(layout.hierarchies) do
    local what
    if h.version == 2 then
      local c = sorted_keys(h.controllers)
      what = string.format("cgroup2 at %s, ten in %s, controllers: %s", h.mount, h.path,
        #c > 0 and table.concat(c, " ") or "none")
    else
      what = string.format("cgroup v1 %s at %s, ten in %s", h.key, h.mount, h.path)
    end
    if h.reason then what = what .. " (unusable: " .. h.reason .. ")" end
    lines[#lines + 1] = what
  end
  for _, e in ipairs(layout.errors) do lines[#lines + 1] = e end
  for _, kind in ipairs(cgroup.KINDS) do
    local k = layout.kinds[kind]
    if k.hier then
      lines[#lines + 1] = string.format("%s limits: cgroup %s, in %s", kind,
        k.version == 2 and "v2" or "v1", k.hier.base)
    else
      lines[#lines + 1] = string.format("%s limits: cannot be enforced: %s", kind, k.reason)
    end
  end
  if layout.track then
    lines[#lines + 1] = string.format("instance processes tracked in cgroup %s %s",
      layout.track.version == 2 and "v2" or ("v1 " .. layout.track.key), layout.track.base)
  else
    lines[#lines + 1] = "instance processes tracked by process group only: " .. layout.track_reason
  end
  return lines
end

---------------------------------------------------------------------------
-- the base cgroup of the instances, in one hierarchy

local function has_word(text, word)
  for w in (text or ""):gmatch("%S+") do
    if w == word or w == "+" .. word then return true end
  end
  return false
end

-- Controllers ten can hand down in cgroup2: of those it limits, the ones
-- its own cgroup is offered.
local function v2_wanted(h)
  local want = {}
  for _, c in ipairs(cgroup.KINDS) do
    if h.controllers[c] then want[#want + 1] = c end
  end
  return want
end

-- Enables controllers `want` in dir's cgroup.subtree_control. -> true | nil, err, code
local function enable(fs, dir, want)
  local cur = fs.read(join(dir, "cgroup.subtree_control")) or ""
  local add = {}
  for _, c in ipairs(want) do
    if not has_word(cur, c) then add[#add + 1] = "+" .. c end
  end
  if #add == 0 then return true end
  return fs.put(join(dir, "cgroup.subtree_control"), table.concat(add, " "))
end

-- Makes h.base exist (and, in cgroup2, pass the controllers down to it).
-- -> true, note | nil, err
local function ensure_base(layout, h)
  if h.ready then return true end
  local fs = layout.fs
  local note
  if h.version == 2 then
    local want = v2_wanted(h)
    if #want > 0 then
      local ok, err, code = enable(fs, h.own, want)
      if not ok and code == "EBUSY" then
        -- cgroup2 lets a cgroup other than the root hand controllers down
        -- only while it holds no processes itself: ten moves into a leaf of
        -- its own cgroup (what systemd's Delegate=yes expects) and retries.
        local leaf = join(h.own, cgroup.LEAF)
        local mk, merr = fs.mkdir(leaf, DIR_MODE)
        if not mk then return nil, merr end
        local moved, perr = fs.put(join(leaf, "cgroup.procs"), tostring(core.proc.getpid()))
        if not moved then return nil, "move ten into " .. leaf .. ": " .. perr end
        note = string.format("moved ten into %s so that %s can hand controllers down", leaf, h.own)
        ok, err, code = enable(fs, h.own, want)
        if not ok and code == "EBUSY" then
          err = string.format("%s: other processes than ten live in %s: run ten in a cgroup of " ..
            "its own (systemd: a service with Delegate=yes)", err, h.own)
        end
      end
      if not ok then return nil, "enable " .. table.concat(want, " ") .. " controllers: " .. err end
    end
    local ok, err = fs.mkdir(h.base, DIR_MODE)
    if not ok then return nil, err end
    if #want > 0 then
      local en, eerr = enable(fs, h.base, want)
      if not en then return nil, "enable " .. table.concat(want, " ") .. " controllers: " .. eerr end
    end
  else
    local ok, err = fs.mkdir(h.base, DIR_MODE)
    if not ok then return nil, err end
  end
  h.ready = true
  return true, note
end

---------------------------------------------------------------------------
-- instance cgroups

local Cgroup = {}
Cgroup.__index = Cgroup

local function check_name(name)
  if type(name) ~= "string" or name == "" or #name > 200 or name:find("[^%w%.%-_:@]")
      or name:sub(1, 1) == "." or name:match("^cgroup%.") then
    error(string.format("cgroup name %q: expected letters, digits, . - _ : @ (not starting with " ..
      "a dot or cgroup.)", tostring(name)), 3)
  end
end

local function check_limits(limits)
  if limits == nil then return {} end
  if type(limits) ~= "table" then error("cgroup limits: expected a table", 3) end
  for k, v in pairs(limits) do
    if k ~= "memory_mb" and k ~= "cpu_shares" and k ~= "pids" then
      error("cgroup limits: unknown field " .. tostring(k) .. " (memory_mb, cpu_shares, pids)", 3)
    end
    if math.type(v) ~= "integer" then error("cgroup limits: " .. k .. " must be an integer", 3) end
  end
  if limits.memory_mb and limits.memory_mb < 1 then error("cgroup limits: memory_mb must be >= 1", 3) end
  if limits.pids and limits.pids < 1 then error("cgroup limits: pids must be >= 1", 3) end
  return limits
end

local LIMIT_FIELD = { memory = "memory_mb", cpu = "cpu_shares", pids = "pids" }
local LIMIT_CONFIG = { memory = "memory_limit_mb", cpu = "cpu_shares", pids = "pids limit" }

-- The pids listed in dir/cgroup.procs and in every cgroup below it.
local function collect_pids(fs, dir, out)
  local text = fs.read(join(dir, "cgroup.procs"))
  for p in (text or ""):gmatch("%d+") do
    local n = tonumber(p)
    if n > 0 then out[#out + 1] = n end
  end
  for _, name in ipairs(fs.readdir(dir) or {}) do
    local sub = join(dir, name)
    local st = fs.stat(sub, false)
    if st and st.type == "directory" then collect_pids(fs, sub, out) end
  end
  return out
end

-- dir and the cgroups below it, deepest first
local function subtree(fs, dir, out)
  out = out or {}
  for _, name in ipairs(fs.readdir(dir) or {}) do
    local sub = join(dir, name)
    local st = fs.stat(sub, false)
    if st and st.type == "directory" then subtree(fs, sub, out) end
  end
  out[#out + 1] = dir
  return out
end

local function new_cgroup(layout, name, members)
  return setmetatable({ layout = layout, fs = layout.fs, name = name, members = members,
    fds = {}, notes = {} }, Cgroup)
end

-- Kills every process in dirs (and below) and waits until none is left.
-- -> true, whether a cgroup.kill was written | nil, err
local function kill_dirs(fs, dirs, timeout_ms)
  local deadline = core.now() + (timeout_ms or KILL_TIMEOUT_MS)
  local pause = 1
  local tried_kill, wrote_kill = {}, false
  while true do
    local pids = {}
    for _, d in ipairs(dirs) do
      if fs.stat(d) then collect_pids(fs, d, pids) end
    end
    if #pids == 0 then return true, wrote_kill end
    -- cgroup2's cgroup.kill takes the whole subtree at once, forks in
    -- flight included; elsewhere each listed pid gets SIGKILL until the
    -- list stays empty. Only when something is left: a group killed that
    -- way cannot be kept for another start (Cgroup:kill_all).
    for _, d in ipairs(dirs) do
      if not tried_kill[d] and fs.stat(join(d, "cgroup.kill")) then
        if fs.put(join(d, "cgroup.kill"), "1") then tried_kill[d], wrote_kill = true, true end
      end
    end
    for _, pid in ipairs(pids) do core.proc.kill(pid, "SIGKILL") end
    if core.now() >= deadline then
      table.sort(pids)
      return nil, string.format("processes still alive after SIGKILL: %s", table.concat(pids, " "))
    end
    core.sleep(pause)
    pause = math.min(pause * 2, 20)
  end
end

-- rmdir each of dirs (deepest cgroups first), retrying while processes
-- still leave. -> true | nil, err
local function remove_dirs(fs, dirs, timeout_ms)
  local deadline = core.now() + (timeout_ms or REMOVE_TIMEOUT_MS)
  local failures = {}
  for _, top in ipairs(dirs) do
    if fs.stat(top) then
      for _, d in ipairs(subtree(fs, top)) do
        local pause = 1
        while true do
          local ok, err, code = fs.rmdir(d)
          if ok or code == "ENOENT" then break end
          if code ~= "EBUSY" or core.now() >= deadline then
            local pids = collect_pids(fs, d, {})
            failures[#failures + 1] = err .. (#pids > 0 and (" (processes: " ..
              table.concat(pids, " ") .. ")") or "")
            break
          end
          core.sleep(pause)
          pause = math.min(pause * 2, 20)
        end
      end
    end
  end
  if #failures > 0 then return nil, table.concat(failures, "; ") end
  return true
end

-- What an instance cgroup is asked to write, per hierarchy.
local function plan_writes(kind, version, value, fs, dir, notes)
  local w = {}
  if kind == "memory" then
    local bytes = tostring(value * 1024 * 1024)
    if version == 2 then
      w[#w + 1] = { "memory.max", bytes }
      -- no swap: the limit is the memory the instance may use, not RAM + swap
      if fs.stat(join(dir, "memory.swap.max")) then w[#w + 1] = { "memory.swap.max", "0" } end
    else
      w[#w + 1] = { "memory.limit_in_bytes", bytes }
      if fs.stat(join(dir, "memory.memsw.limit_in_bytes")) then
        w[#w + 1] = { "memory.memsw.limit_in_bytes", bytes }
      end
    end
  elseif kind == "cpu" then
    local weight = value
    if weight < CPU_WEIGHT_MIN or weight > CPU_WEIGHT_MAX then
      weight = math.max(CPU_WEIGHT_MIN, math.min(CPU_WEIGHT_MAX, weight))
      notes[#notes + 1] = string.format("cpu_shares = %d is outside %d-%d: using %d", value,
        CPU_WEIGHT_MIN, CPU_WEIGHT_MAX, weight)
    end
    if version == 2 then
      w[#w + 1] = { "cpu.weight", tostring(weight) }
    else
      local shares = math.max(V1_SHARES_MIN, math.min(V1_SHARES_MAX, weight * 1024 // 100))
      w[#w + 1] = { "cpu.shares", tostring(shares) }
    end
  elseif kind == "pids" then
    w[#w + 1] = { "pids.max", tostring(value) }
  end
  return w
end

-- cgroup.create(layout, name, limits [, opts]) -> cg | nil, err
--   limits = { memory_mb =, cpu_shares =, pids = } (each optional)
--   opts.accounting (default true): also join the memory and cpuacct
--   hierarchies without a limit, so usage() can tell memory and CPU time.
-- A limit no hierarchy can enforce is refused with the reason. cg.notes
-- lists what the log should say (a clamped value, ten moved into a leaf).
-- Any cgroup left with this name by an earlier run is emptied and replaced.
-- Must run in a task (replacing a leftover cgroup waits for its processes).
function cgroup.create(layout, name, limits, opts)
  check_name(name)
  limits = check_limits(limits)
  opts = opts or {}
  local fs = layout.fs

  for _, kind in ipairs(cgroup.KINDS) do
    local v = limits[LIMIT_FIELD[kind]]
    if v and not layout.kinds[kind].hier then
      return nil, string.format("%s = %d cannot be enforced: %s", LIMIT_CONFIG[kind], v,
        layout.kinds[kind].reason)
    end
  end

  -- hierarchy -> kinds to write there, in a stable order
  local order, by_hier = {}, {}
  local function want(h)
    if not h then return end
    if not by_hier[h] then
      by_hier[h] = {}
      order[#order + 1] = h
    end
    return by_hier[h]
  end
  want(layout.track)
  for _, kind in ipairs(cgroup.KINDS) do
    local v = limits[LIMIT_FIELD[kind]]
    if v then
      local list = want(layout.kinds[kind].hier)
      list[#list + 1] = { kind = kind, value = v, version = layout.kinds[kind].version }
    end
  end
  if opts.accounting ~= false then
    want(layout.kinds.memory.hier)
    want(layout.cpuacct)
  end

  local cg = new_cgroup(layout, name, {})
  if #order == 0 then
    cg.notes[#cg.notes + 1] = "no cgroup for " .. name .. ": " .. (layout.track_reason or "none usable")
    return cg
  end
  for _, h in ipairs(order) do
    local ok, note = ensure_base(layout, h)
    if not ok then
      cg:remove(0)
      return nil, string.format("cgroup %s: %s", name, note)
    end
    if note then cg.notes[#cg.notes + 1] = note end
    local dir = join(h.base, name)
    if fs.stat(dir) then
      -- left by a ten that died: its processes must not join the new instance
      local removed, rerr = kill_dirs(fs, { dir })
      if removed then removed, rerr = remove_dirs(fs, { dir }) end
      if not removed then
        cg:remove(0)
        return nil, string.format("cgroup %s: a leftover %s cannot be removed: %s", name, dir, rerr)
      end
      cg.notes[#cg.notes + 1] = "removed a leftover cgroup " .. dir
    end
    local ok2, err = fs.mkdir(dir, DIR_MODE, false)
    if not ok2 then
      cg:remove(0)
      return nil, string.format("cgroup %s: %s", name, err)
    end
    local member = { hier = h, dir = dir, version = h.version }
    cg.members[#cg.members + 1] = member
    for _, l in ipairs(by_hier[h]) do
      for _, wr in ipairs(plan_writes(l.kind, l.version, l.value, fs, dir, cg.notes)) do
        local put, perr = fs.put(join(dir, wr[1]), wr[2])
        if not put then
          cg:remove(0)
          return nil, string.format("cgroup %s: set %s = %s: %s", name, wr[1], wr[2], perr)
        end
      end
      member[l.kind] = true
    end
    if h == layout.track then member.track = true end
  end
  cg.limits = limits
  return cg
end

-- cg:dirs() -> the cgroup directories of the instance, one per hierarchy
function Cgroup:dirs()
  local out = {}
  for i, m in ipairs(self.members) do out[i] = m.dir end
  return out
end

local function member_with(cg, pred)
  for _, m in ipairs(cg.members) do
    if pred(m) then return m end
  end
end

-- cg:proc_fds() -> { fd, ... }, into | nil, err: for core.proc.spawn, the
-- cgroup.procs of each v1 hierarchy, open O_WRONLY|O_CLOEXEC, as its
-- cgroup_fds (the child writes "0" to each before exec), and the cgroup2
-- directory, open O_RDONLY, as its cgroup_into (the child is born there:
-- no migration, which would wait for an RCU grace period). Close them with
-- cg:close_fds() after.
function Cgroup:proc_fds()
  self:close_fds()
  local fds, all, into = {}, {}, nil
  for _, m in ipairs(self.members) do
    local fd, err
    if m.version == 2 then
      fd, err = self.fs.open_fd(m.dir, "r")
      into = fd
    else
      fd, err = self.fs.open_fd(join(m.dir, "cgroup.procs"), "w")
      fds[#fds + 1] = fd
    end
    if not fd then
      for _, f in ipairs(all) do self.fs.close_fd(f) end
      return nil, err
    end
    all[#all + 1] = fd
  end
  self.fds = all
  return fds, into
end

-- cg:close_fds(): idempotent
function Cgroup:close_fds()
  for _, f in ipairs(self.fds) do self.fs.close_fd(f) end
  self.fds = {}
end

local function read_number(fs, path, pattern)
  local text = fs.read(path)
  if not text then return nil end
  return tonumber(pattern and text:match(pattern) or text:match("%d+"))
end

-- cg:usage() -> { memory_bytes =, cpu_seconds = } (nil fields where unknown)
function Cgroup:usage()
  local fs, out = self.fs, {}
  local mem = member_with(self, function(m) return m.hier == self.layout.kinds.memory.hier end)
  if mem then
    out.memory_bytes = mem.version == 2 and read_number(fs, join(mem.dir, "memory.current"))
      or read_number(fs, join(mem.dir, "memory.usage_in_bytes"))
  end
  local v2 = member_with(self, function(m) return m.version == 2 end)
  local usec = v2 and read_number(fs, join(v2.dir, "cpu.stat"), "usage_usec (%d+)")
  if usec then
    out.cpu_seconds = usec / 1e6
  else
    local acct = member_with(self, function(m) return m.hier.controllers.cpuacct end)
    local ns = acct and read_number(fs, join(acct.dir, "cpuacct.usage"))
    if ns then out.cpu_seconds = ns / 1e9 end
  end
  return out
end

-- cg:oom_kills() -> count | nil (no memory cgroup): processes the kernel
-- killed for exceeding the memory limit, since the cgroup was created.
function Cgroup:oom_kills()
  local mem = member_with(self, function(m) return m.hier == self.layout.kinds.memory.hier end)
  if not mem then return nil end
  if mem.version == 2 then
    return read_number(self.fs, join(mem.dir, "memory.events"), "oom_kill (%d+)") or 0
  end
  return read_number(self.fs, join(mem.dir, "memory.oom_control"), "oom_kill (%d+)") or 0
end

-- cg:memory_limit_mb() -> the limit written, or nil
function Cgroup:memory_limit_mb() return self.limits and self.limits.memory_mb end

-- cg:pids() -> sorted pids of every process in the instance's cgroups
function Cgroup:pids()
  local seen, out = {}, {}
  for _, m in ipairs(self.members) do
    for _, p in ipairs(collect_pids(self.fs, m.dir, {})) do
      if not seen[p] then seen[p] = true out[#out + 1] = p end
    end
  end
  table.sort(out)
  return out
end

-- cg:kill_all([timeout_ms=5000]) -> true | nil, err. SIGKILL to every
-- process of the instance (cgroup.kill in cgroup2), waiting until none is
-- left. In a task.
-- cg.killed_whole is set once a cgroup.kill was written: on some kernels
-- (6.18 here) every child later born into that cgroup2 group by
-- clone3(CLONE_INTO_CGROUP) is SIGKILLed at once (the fork compares the
-- kill count of the parent's group with the target's), so such a group is
-- never used for another start.
function Cgroup:kill_all(timeout_ms)
  local ok, wrote_kill = kill_dirs(self.fs, self:dirs(), timeout_ms)
  if not ok then return nil, wrote_kill end
  if wrote_kill then self.killed_whole = true end
  return true
end

-- cg:remove([timeout_ms=2000]) -> true | nil, err. Removes the cgroups
-- (after kill_all: a cgroup with processes cannot go). Idempotent. In a task.
function Cgroup:remove(timeout_ms)
  self:close_fds()
  local ok, err = remove_dirs(self.fs, self:dirs(), timeout_ms)
  if ok then self.members = {} end
  return ok, err
end

function Cgroup:__tostring()
  return "tenement.cgroup " .. self.name .. " (" .. table.concat(self:dirs(), ", ") .. ")"
end

-- cgroup.open(layout, name) -> cg: the instance cgroups named `name` that
-- exist now (for specs and tools; limits unknown).
function cgroup.open(layout, name)
  check_name(name)
  local members = {}
  for _, h in ipairs(layout.hierarchies) do
    if h.base and not h.reason then
      local dir = join(h.base, name)
      if layout.fs.stat(dir) then
        members[#members + 1] = { hier = h, dir = dir, version = h.version, track = h == layout.track }
      end
    end
  end
  return new_cgroup(layout, name, members)
end

-- cgroup.bases(layout) -> the directories under which this server's
-- instance cgroups live, one per usable hierarchy.
function cgroup.bases(layout)
  local out = {}
  for _, h in ipairs(layout.hierarchies) do
    if h.base and not h.reason then out[#out + 1] = h.base end
  end
  return out
end

-- cgroup.cleanup_stale(layout [, prefix]) -> removed names, failures
-- Instance cgroups left under the base by a ten that died (names starting
-- with prefix, all of them by default): what runs inside is killed, then
-- the cgroups are removed. Only for a base no live server uses. In a task.
function cgroup.cleanup_stale(layout, prefix)
  prefix = prefix or ""
  local fs = layout.fs
  local names = {}
  for _, base in ipairs(cgroup.bases(layout)) do
    for _, n in ipairs(fs.readdir(base) or {}) do
      local st = fs.stat(join(base, n), false)
      if st and st.type == "directory" and n:sub(1, #prefix) == prefix then names[n] = true end
    end
  end
  local removed, failures = {}, {}
  for _, n in ipairs(sorted_keys(names)) do
    local cg = cgroup.open(layout, n)
    local ok, err = cg:kill_all()
    if ok then ok, err = cg:remove() end
    if ok then removed[#removed + 1] = n
    else failures[#failures + 1] = string.format("stale cgroup %s: %s", n, err) end
  end
  return removed, failures
end

return cgroup
