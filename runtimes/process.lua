-- Isolation level "process": a bare process, no walls. For trusted code and
-- debugging. Every level returns the same spawn description, so the core
-- spawns and supervises them all the same way.
local driver = { name = "process" }

function driver.available()
  return true
end

-- prepare(instance) -> spec for core.proc.spawn
--   instance: { argv, env (list of "K=V"), cwd, stdout_fd, stderr_fd }
function driver.prepare(instance)
  return require("tenement.runtime").credentials(instance, {
    argv = instance.argv,
    env = instance.env,
    cwd = instance.cwd,
    stdin = "null",
    stdout = instance.stdout_fd,
    stderr = instance.stderr_fd,
    pdeathsig = "SIGKILL",
  })
end

return driver
