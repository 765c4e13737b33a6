-- Entry point of the `ten` binary: picks the personality from argv[0].
return function(self, argv)
  local args = {}
  for i = 1, #argv do args[i] = argv[i] end
  if self == "slum" then
    io.stderr:write("slum: not available yet\n")
    return 1
  end
  return require("tenement.cli").main(args)
end
