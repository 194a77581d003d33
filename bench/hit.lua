-- Users warm1..warm1000, already cached by bench/run.py: always a cache hit.
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  return wrk.format("GET", "/v1/amplitude/recommendations?rec_id=testRecId&user_id=warm"
    .. math.random(1, 1000))
end
