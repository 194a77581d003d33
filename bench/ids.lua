-- Per-thread ids: setup() numbers the threads so generated user ids never repeat.
local threads = 0
setup = function(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
counter = 0
prefix = tostring(os.time()) .. "-" .. tostring(math.random(1, 1000000))
