-- Storage quotas: an instance with storage_quota_mb gets its data directory
-- on a file system of its own, an ext4 image in a sparse file beside the
-- instance directory ({data_dir}/{service}/{id}.img: ids hold no ".", so
-- it never collides with an instance directory) mounted over
-- {data_dir}/{service}/{id} through a loop device. Writing past the quota
-- then fails inside the instance with ENOSPC, like a full disk, and nothing
-- outside it is touched.
--
-- The image is sized so that the space an instance can use is the quota
-- (ext4 spends some of it on inode tables and a reserve for delayed
-- allocation); it is formatted without a journal (a journal is at least
-- 4 MB, a lot for small quotas) and checked with e2fsck before a mount when
-- it was not cleanly unmounted. A quota raised later grows the file system
-- online, after the mount (resize2fs); a lower one is refused: shrinking
-- would have to move data. The quota an image was made for is its label.
--
-- A mount lives on in every mount namespace created while it existed
-- (namespaced instances make theirs with private propagation), after ten
-- unmounted it: the file system then stays in use through its loop device.
-- attach sees that, never checks or resizes such an image offline, and
-- mount(8) reuses the loop device, so it is never mounted twice. share()
-- prevents it, for namespaces made with slave propagation.
--
-- mkfs.ext4, e2fsck, resize2fs, tune2fs (e2fsprogs), mount, umount and
-- losetup run
-- as child processes in the calling task, never blocking the loop: attach,
-- detach and cleanup_stale must be called in a task. Mounting needs root.
local core = require "tenement.core"
local fs = core.fs

local storage = {}

-- Where the tools are looked for: sbin included, whatever the server's PATH.
storage.PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
storage.MOUNT_OPTIONS = "loop,nosuid,nodev"

local MiB = 1024 * 1024
local BLOCK = 4096
-- One inode per 16 KB (ext4's default for ordinary file systems), 256 bytes
-- each: 1/64 of the image. Group descriptors, bitmaps and the blocks kept
-- for growing add about 0.35%; the root directory and lost+found 48 KB.
local META_FRACTION = 0.0197
local META_FIXED = 48 * 1024
-- ext4 keeps 2% of the blocks, at most 4096 of them, out of what statfs
-- calls available and what a writer can fill (for delayed allocation).
local RESERVE_FRACTION = 0.02
local RESERVE_MAX = 4096 * BLOCK
local TOOL_TIMEOUT_MS = 120000
local LABEL_PREFIX = "tnq="
local EXT4_MAGIC = 0xEF53

local PACKAGES = {
  ["mkfs.ext4"] = "e2fsprogs", e2fsck = "e2fsprogs", resize2fs = "e2fsprogs", tune2fs = "e2fsprogs",
  mount = "mount", umount = "mount", losetup = "mount",
}

---------------------------------------------------------------------------
-- helpers

local function is_root()
  local euid = core.proc.geteuid()
  return euid == 0, euid
end

local function check_name(what, s)
  if type(s) ~= "string" or s == "" or s:find("[/%.%z]") then
    error(string.format("storage: %s must be a non-empty name without / or . (got %q)", what, tostring(s)), 3)
  end
end

local function check_args(data_dir, service, id)
  if type(data_dir) ~= "string" or data_dir == "" then error("storage: data_dir must be a path", 3) end
  check_name("service", service)
  check_name("id", id)
end

-- -> instance dir, image path
function storage.paths(data_dir, service, id)
  local base = data_dir:gsub("/+$", "") .. "/" .. service
  return base .. "/" .. id, base .. "/" .. id .. ".img"
end

-- The size of the image for a quota: the usable space (what statfs shows
-- as available on the empty file system, what a writer can fill) comes out
-- at the quota or a little above it (at most about 1%).
function storage.image_bytes(quota_mb)
  local q = quota_mb * MiB
  -- reserve at its 2% or at its cap, whichever is smaller
  local a = (q + META_FIXED) / (1 - META_FRACTION - RESERVE_FRACTION)
  local b = (q + META_FIXED + RESERVE_MAX) / (1 - META_FRACTION)
  local s = math.ceil(math.min(a, b))
  local unit = 64 * 1024
  return (s + unit - 1) // unit * unit
end

-- Runs a tool; -> true | nil, err. stderr is what the error tells.
local function run(argv, opts)
  local tool = argv[1]
  local path = opts.path or storage.PATH
  local p, err, code = core.proc.spawn {
    argv = argv, env = { "PATH=" .. path, "LC_ALL=C" },
    stdin = "null", stdout = "null", stderr = "pipe",
  }
  if not p then
    if code == "ENOENT" and not tool:find("/") then
      return nil, string.format("%s not found in PATH %s: install %s (apt-get install %s)", tool, path,
        PACKAGES[tool] or "it", PACKAGES[tool] or tool), "ENOTOOL"
    end
    return nil, err, code
  end
  local deadline = core.now() + (opts.timeout or TOOL_TIMEOUT_MS)
  local parts = {}
  while true do
    local chunk, rerr = p.stderr:read(math.max(1, deadline - core.now()))
    if not chunk then
      if rerr then
        p:kill("SIGKILL")
        p:wait()
        p:close()
        return nil, string.format("%s: %s", table.concat(argv, " "), rerr == "timeout" and
          ("no answer within " .. (opts.timeout or TOOL_TIMEOUT_MS) // 1000 .. " s") or rerr)
      end
      break
    end
    if #parts < 64 then parts[#parts + 1] = chunk end
  end
  local st = p:wait()
  p:close()
  local text = table.concat(parts):gsub("%s+$", ""):gsub("\n+", "; ")
  if st.code == 0 or (opts.ok_codes and opts.ok_codes[st.code]) then return true, st.code, text end
  local how = st.signal and ("killed by " .. st.signal) or ("exit " .. tostring(st.code))
  return nil, string.format("%s failed (%s)%s", table.concat(argv, " "), how,
    text ~= "" and (": " .. text) or ""), st.code
end

local function unescape(s)
  return (s:gsub("\\(%d%d%d)", function(o) return string.char(tonumber(o, 8)) end))
end

-- Mounts whose mount point is dir (the last one is on top).
local function mounts_at(dir)
  local text = fs.read("/proc/self/mountinfo") or ""
  local out = {}
  for line in text:gmatch("[^\n]+") do
    local point, fstype, source = line:match("^%S+ %S+ %S+ %S+ (%S+) .- %- (%S+) (%S+)")
    if point and unescape(point) == dir then
      out[#out + 1] = { fstype = fstype, source = unescape(source) }
    end
  end
  return out
end

-- The file behind a loop device, or nil (also for a file deleted since:
-- whatever now has its name is another file).
local function loop_backing(dev)
  local name = dev:match("^/dev/(loop%d+)$")
  if not name then return nil end
  local s = fs.read("/sys/block/" .. name .. "/loop/backing_file")
  if not s or s:find(" %(deleted%)\n?$") then return nil end
  return (s:gsub("\n$", ""))
end

-- The loop devices backed by image now. A file system stays alive after
-- our unmount while another mount namespace holds a copy of the mount
-- (a namespaced instance started while it was mounted, with private
-- propagation), or a lazy unmount waits for its last user.
local function loops_of(image)
  local real = fs.realpath(image)
  local out = {}
  if not real then return out end
  for _, n in ipairs(fs.readdir("/sys/block") or {}) do
    if n:match("^loop%d+$") and loop_backing("/dev/" .. n) == real then out[#out + 1] = "/dev/" .. n end
  end
  return out
end
storage.loops_of = loops_of

-- The mount of image on dir, if there is one: -> { source } | nil, other mount
local function our_mount(dir, image)
  local list = mounts_at(dir)
  local top = list[#list]
  if not top then return nil end
  local real = fs.realpath(image)
  if real and loop_backing(top.source) == real then return top end
  return nil, top
end

-- The ext4 superblock of an unmounted image. -> sb | nil, err
function storage.superblock(image)
  local f, err = io.open(image, "rb")
  if not f then return nil, err end
  f:seek("set", 1024)
  local sb = f:read(1024)
  f:close()
  if not sb or #sb < 1024 or string.unpack("<I2", sb, 57) ~= EXT4_MAGIC then
    return nil, image .. " holds no ext4 file system"
  end
  local lo = string.unpack("<I4", sb, 5)
  local hi = string.unpack("<I4", sb, 0x150 + 1)
  local bsize = 1024 << string.unpack("<I4", sb, 25)
  local label = sb:sub(121, 136):gsub("%z.*$", "")
  return {
    block_size = bsize,
    bytes = (lo + (hi << 32)) * bsize,
    state = string.unpack("<I2", sb, 59),
    label = label,
    quota_mb = tonumber(label:match("^" .. LABEL_PREFIX .. "(%d+)$")),
  }
end

---------------------------------------------------------------------------
-- attach

local Mount = {}
Mount.__index = Mount

local function fsck(image, opts)
  -- -p repairs what is safe to repair without asking; 1 means it did
  local ok, err = run({ "e2fsck", "-p", image }, { path = opts.path, ok_codes = { [1] = true } })
  if not ok then
    return nil, err .. "; repair it by hand (e2fsck -f " .. image .. ") or move it away"
  end
  return true
end

local function create_image(image, quota_mb, opts)
  local tmp = image .. ".new"
  fs.unlink(tmp)
  local ok, err = fs.truncate(tmp, storage.image_bytes(quota_mb), 384)
  if not ok then return nil, err end
  ok, err = run({ "mkfs.ext4", "-q", "-F", "-m", "0", "-b", tostring(BLOCK), "-i", "16384",
    "-O", "^has_journal", "-E", "lazy_itable_init=0", "-L", LABEL_PREFIX .. quota_mb, tmp }, opts)
  if not ok then fs.unlink(tmp) return nil, err end
  -- only a formatted image ever has the final name
  local renamed, rerr = os.rename(tmp, image)
  if not renamed then fs.unlink(tmp) return nil, rerr end
  return true
end

-- Grows the unmounted, unused image to the new quota's size, offline (no
-- capability needed beyond writing the file).
local function grow_offline(image, quota_mb, opts)
  local size = (fs.stat(image) or {}).size or 0
  local want = storage.image_bytes(quota_mb)
  if want > size then
    -- resize2fs insists on a file system checked since its last mount
    local ok, err = run({ "e2fsck", "-f", "-p", image }, { path = opts.path, ok_codes = { [1] = true } })
    if not ok then return nil, err end
    ok, err = fs.truncate(image, want)
    if not ok then return nil, err end
    ok, err = run({ "resize2fs", image }, opts)
    if not ok then
      fs.truncate(image, size)
      return nil, err
    end
  end
  return run({ "tune2fs", "-L", LABEL_PREFIX .. quota_mb, image }, opts)
end

-- Grows a file system that is mounted (dev, a loop device still in use in
-- another mount namespace) online, as ext4 allows. Needs CAP_SYS_RESOURCE.
local function grow_online(image, dev, quota_mb, opts)
  local size = (fs.stat(image) or {}).size or 0
  local want = storage.image_bytes(quota_mb)
  if want > size then
    local ok, err = fs.truncate(image, want)
    if not ok then return nil, err end
    -- a loop device keeps the size it saw at setup until told
    ok, err = run({ "losetup", "-c", dev }, opts)
    if not ok then return nil, err end
  end
  local ok, err = run({ "resize2fs", dev }, opts)
  if not ok then return nil, err end
  return run({ "tune2fs", "-L", LABEL_PREFIX .. quota_mb, dev }, opts)
end

local function is_empty_dir(dir)
  local list = fs.readdir(dir)
  return list == nil or #list == 0
end

-- storage.attach(data_dir, service, id, quota_mb [, opts]) -> mount | nil, err, lasting
--   opts.path: PATH for the tools (default storage.PATH)
--   opts.mode: mode of the mounted root (default 0700, as the instance dir)
-- Creates the image the first time, grows it when the quota was raised,
-- refuses a lower quota (lasting: no retry mends it), checks it when it was not cleanly unmounted,
-- and mounts it on the instance directory. A mount of the same image left
-- there (by a ten that died) is replaced. mount.notes lists what the log
-- should say (created, grown, checked, replaced). In a task; needs root.
function storage.attach(data_dir, service, id, quota_mb, opts)
  check_args(data_dir, service, id)
  if math.type(quota_mb) ~= "integer" or quota_mb < 1 then
    error("storage.attach: quota_mb must be an integer >= 1", 2)
  end
  opts = opts or {}
  local dir = storage.paths(data_dir, service, id)
  local key = service .. ":" .. id
  local root, euid = is_root()
  if not root then
    return nil, string.format("storage_quota_mb = %d for %s needs root: it mounts a file system " ..
      "image through a loop device (ten runs as uid %s)", quota_mb, key, tostring(euid))
  end
  local notes = {}
  local ok, err = fs.mkdir(dir, 448)
  if not ok then return nil, err end
  -- the mount point as /proc/self/mountinfo will show it
  dir = assert(fs.realpath(dir))
  local image = dir .. ".img"

  local mine, other = our_mount(dir, image)
  if other then
    return nil, string.format("%s is already a mount point (%s, %s): refusing to mount %s's storage " ..
      "over it", dir, other.source, other.fstype, key)
  end
  if mine then
    local done, derr = storage.detach_dir(dir, opts)
    if not done then return nil, "a mount left from before: " .. derr end
    notes[#notes + 1] = "unmounted " .. dir .. " left mounted from before"
  end

  local growing
  if not fs.stat(image) then
    if not is_empty_dir(dir) then
      return nil, string.format("%s holds files from before storage_quota_mb was set for %s: they " ..
        "would be hidden under the quota's file system; move them away first", dir, key)
    end
    ok, err = create_image(image, quota_mb, opts)
    if not ok then return nil, err end
    notes[#notes + 1] = string.format("created %s (%d MB quota)", image, quota_mb)
  else
    local sb
    sb, err = storage.superblock(image)
    if not sb then return nil, err .. ": move it away to start with an empty one" end
    local old = sb.quota_mb
    local old_bytes = old and storage.image_bytes(old) or sb.bytes
    if (old and quota_mb < old) or (not old and storage.image_bytes(quota_mb) < sb.bytes) then
      return nil, string.format("storage_quota_mb of %s was lowered from %s to %d MB: shrinking its " ..
        "file system is not supported; raise it back, or stop the instance and delete %s to start " ..
        "over empty", key, old and tostring(old) or string.format("about %d", old_bytes // MiB),
        quota_mb, image), true
    end
    local live = loops_of(image)
    if #live > 0 then
      -- still mounted elsewhere: the kernel owns it, so no check (the
      -- superblock on disk says "in use" anyway); mount(8) reuses the
      -- loop device, so the file system is mounted once, never twice
      notes[#notes + 1] = string.format("%s is still in use elsewhere (%s, another mount namespace): " ..
        "mounting the same file system again", image, table.concat(live, " "))
    elseif sb.state ~= 1 then
      -- 1: cleanly unmounted; anything else (a crash, errors) is checked
      ok, err = fsck(image, opts)
      if not ok then return nil, err end
      notes[#notes + 1] = "checked " .. image .. " (it was not cleanly unmounted)"
    end
    if quota_mb ~= old then
      if #live == 0 then
        ok, err = grow_offline(image, quota_mb, opts)
        if not ok then return nil, "grow to " .. quota_mb .. " MB: " .. err end
        notes[#notes + 1] = string.format("grew %s from %s to %d MB", image, tostring(old or "?"), quota_mb)
      else
        growing = { from = old }
      end
    end
  end

  ok, err = run({ "mount", "-t", "ext4", "-o", storage.MOUNT_OPTIONS, image, dir }, opts)
  if not ok then return nil, err end
  local mounted = our_mount(dir, image)
  if not mounted then
    storage.detach_dir(dir, opts)
    return nil, string.format("mount %s on %s: the mount that appeared is not of this image", image, dir)
  end
  if growing then
    -- the device now mounted, checked to be backed by this image (the one
    -- seen in use before may have been released and reused meanwhile)
    ok, err = grow_online(image, mounted.source, quota_mb, opts)
    if ok then
      notes[#notes + 1] = string.format("grew %s from %s to %d MB", image, tostring(growing.from or "?"), quota_mb)
    else
      -- the instance still gets its data; the label keeps the old quota,
      -- so the next attach tries again
      notes[#notes + 1] = string.format("could not grow %s to %d MB while it is in use elsewhere (%s); " ..
        "it keeps %s MB until a start when no other mount namespace holds it", image, quota_mb, err,
        tostring(growing.from or "its old size"))
    end
  end
  ok, err = fs.chmod(dir, opts.mode or 448)
  if not ok then
    storage.detach_dir(dir, opts)
    return nil, err
  end
  return setmetatable({ dir = dir, image = image, quota_mb = quota_mb, service = service, id = id,
    notes = notes, path = opts.path, attached = true }, Mount)
end

-- storage.detach_dir(dir [, opts]) -> true [, note] | nil, err: unmounts
-- whatever is mounted on dir; lazily when it is busy, saying so.
function storage.detach_dir(dir, opts)
  opts = opts or {}
  if #mounts_at(dir) == 0 then return true end
  local ok, err = run({ "umount", dir }, opts)
  if ok then return true end
  local lazy, lerr = run({ "umount", "-l", dir }, opts)
  if not lazy then return nil, err .. "; lazily: " .. lerr end
  return true, err .. ": detached lazily; the file system goes away when its last user does"
end

-- mount:detach() -> true [, note] | nil, err. Idempotent. A busy file system
-- (a process still has files open there) is detached lazily, and the note
-- says so; so does one that lives on in another mount namespace.
function Mount:detach()
  if not self.attached then return true end
  local ok, note = storage.detach_dir(self.dir, { path = self.path })
  if not ok then return nil, note end
  self.attached = false
  local live = loops_of(self.image)
  if #live > 0 and not note then
    note = string.format("unmounted %s, but its file system stays in use through %s in another mount " ..
      "namespace until the processes there end", self.dir, table.concat(live, " "))
  end
  return true, note
end

-- mount:resize(quota_mb) -> true [, note] | nil, err, lasting: the quota of
-- a file system still mounted (an instance replaced by a rollout keeps its
-- mount), grown online to a raised one; a lower one is refused, as attach
-- refuses it. In a task.
function Mount:resize(quota_mb)
  if quota_mb == self.quota_mb then return true end
  local key = self.service .. ":" .. self.id
  if quota_mb < self.quota_mb then
    return nil, string.format("storage_quota_mb of %s was lowered from %d to %d MB: shrinking its file system " ..
      "is not supported; raise it back, or stop the instance and delete %s to start over empty", key,
      self.quota_mb, quota_mb, self.image), true
  end
  local mounted = our_mount(self.dir, self.image)
  if not mounted then return nil, string.format("%s is no longer mounted on %s", self.image, self.dir) end
  local ok, err = grow_online(self.image, mounted.source, quota_mb, { path = self.path })
  if not ok then return nil, "grow to " .. quota_mb .. " MB: " .. err end
  local from = self.quota_mb
  self.quota_mb = quota_mb
  return true, string.format("grew %s from %d to %d MB", self.image, from, quota_mb)
end

function Mount:usage() return storage.usage(self.dir) end

function Mount:__tostring()
  return string.format("tenement.storage %s on %s (%d MB%s)", self.image, self.dir, self.quota_mb,
    self.attached and "" or ", detached")
end

-- storage.share(data_dir [, opts]) -> true | nil, err. Makes data_dir a
-- shared mount (a bind mount on itself first, if it is no mount point), so
-- that mounting and unmounting instance storage under it reaches every
-- mount namespace made with slave propagation (MS_SLAVE): an instance's
-- file system then really goes away when ten unmounts it. Namespaces made
-- with private propagation keep their copies whatever this does. Call it
-- once at server start, before instances are spawned. In a task; root.
-- The data directories share() bound on themselves: unshare() takes
-- those mounts away again, and no other.
local bound = {}

-- Is the mount on top of dir a bind of dir on itself (what share() makes,
-- here or in a ten that died before it could undo it)? Same device as the
-- mount beneath, and rooted at dir's own place in it.
local function self_bound(dir)
  local by_id, top = {}, nil
  for line in (fs.read("/proc/self/mountinfo") or ""):gmatch("[^\n]+") do
    local id, parent, dev, root, point = line:match("^(%d+) (%d+) (%S+) (%S+) (%S+) ")
    if id then
      local m = { parent = parent, dev = dev, root = unescape(root), point = unescape(point) }
      by_id[id] = m
      if m.point == dir then top = m end
    end
  end
  local under = top and by_id[top.parent]
  if not under or under.dev ~= top.dev then return false end
  local rel
  if under.point == "/" then rel = dir
  elseif dir:sub(1, #under.point + 1) == under.point .. "/" then rel = dir:sub(#under.point + 1)
  else return false end
  return top.root == (under.root == "/" and rel or under.root .. rel)
end

function storage.share(data_dir, opts)
  opts = opts or {}
  local root, euid = is_root()
  if not root then return nil, "sharing mounts needs root (ten runs as uid " .. tostring(euid) .. ")" end
  local ok, err = fs.mkdir(data_dir, 493)
  if not ok then return nil, err end
  local dir = assert(fs.realpath(data_dir))
  if #mounts_at(dir) == 0 then
    ok, err = run({ "mount", "--bind", dir, dir }, opts)
    if not ok then return nil, err end
    bound[dir] = true
  elseif self_bound(dir) then
    -- left by a ten killed before it could take it away: ours to undo
    bound[dir] = true
  end
  ok, err = run({ "mount", "--make-shared", dir }, opts)
  if not ok then return nil, err end
  return true
end

-- storage.unshare(data_dir [, opts]) -> true | nil, err. At server stop,
-- once every instance is detached: unmounts the bind mount share() made
-- (left there, the data directory would stay a mount point after ten is
-- gone: `rm -r` of it fails, and every stop and start of ten on another
-- directory would leave one more). A mount share() found there already,
-- or one with instance images still on it, stays. In a task.
function storage.unshare(data_dir, opts)
  local dir = fs.realpath(data_dir)
  if not dir or not bound[dir] then return true end
  if #storage.mounted(dir) > 0 then return nil, dir .. " still has instance images mounted: left shared" end
  -- lazily: ten still holds files open there (its lock), and a bind of
  -- the directory on itself hides nothing, so nothing differs meanwhile
  local ok, err = run({ "umount", "-l", dir }, opts or {})
  if not ok then return nil, err end
  bound[dir] = nil
  return true
end

-- storage.remove(data_dir, service, id) -> true | nil, err: deletes the
-- image (the instance's data). Refused while it is mounted.
function storage.remove(data_dir, service, id)
  check_args(data_dir, service, id)
  local dir, image = storage.paths(data_dir, service, id)
  local real = fs.realpath(dir)
  if real and our_mount(real, real .. ".img") then
    return nil, string.format("%s is still mounted on %s: detach it first", image, real)
  end
  fs.unlink(image .. ".new")
  local ok, err, code = fs.unlink(image)
  if not ok and code ~= "ENOENT" then return nil, err end
  return true
end

-- storage.usage(path) -> used_bytes, quota_bytes | nil, err. Of the file
-- system holding path: on an instance's mount, what it holds and what it
-- may hold in all (used + what a writer can still add).
function storage.usage(path)
  local st, err = fs.statfs(path)
  if not st then return nil, err end
  local used = st.size - st.free
  return used, used + st.avail
end

-- storage.mounted(data_dir) -> { { dir, image, source } }: instance images
-- mounted under data_dir now.
function storage.mounted(data_dir)
  local root = fs.realpath(data_dir)
  local out = {}
  if not root then return out end
  local text = fs.read("/proc/self/mountinfo") or ""
  for line in text:gmatch("[^\n]+") do
    local point, source = line:match("^%S+ %S+ %S+ %S+ (%S+) .- %- %S+ (%S+)")
    point = point and unescape(point)
    if point and point:sub(1, #root + 1) == root .. "/" and point:sub(#root + 2):match("^[^/]+/[^/]+$") then
      local backing = loop_backing(unescape(source))
      if backing == point .. ".img" then
        out[#out + 1] = { dir = point, image = backing, source = unescape(source) }
      end
    end
  end
  return out
end

-- storage.cleanup_stale(data_dir [, opts]) -> detached dirs, failures.
-- Unmounts the instance images a ten that died left mounted (call it at
-- server start, before instances are restored). In a task.
function storage.cleanup_stale(data_dir, opts)
  local done, failures = {}, {}
  for _, m in ipairs(storage.mounted(data_dir)) do
    local ok, err = storage.detach_dir(m.dir, opts)
    if ok then done[#done + 1] = m.dir
    else failures[#failures + 1] = string.format("stale mount %s: %s", m.dir, err) end
  end
  return done, failures
end

return storage
