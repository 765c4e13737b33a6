-- Loaded by busted before the specs (see .busted): the runtime drivers live
-- in runtimes/ but are named tenement.runtimes.NAME, as in the ten binary.
table.insert(package.searchers, 2, function(name)
  local rel = name:match("^tenement%.runtimes%.(.+)$")
  if not rel then return nil end
  local path = "runtimes/" .. rel:gsub("%.", "/") .. ".lua"
  local f = io.open(path)
  if not f then return "\n\tno file '" .. path .. "'" end
  f:close()
  return assert(loadfile(path)), path
end)
