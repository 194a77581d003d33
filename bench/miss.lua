-- Every request a distinct user: always a cache miss.
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/amplitude/recommendations?rec_id=testRecId&user_id=miss-"
    .. prefix .. "-" .. tid .. "-" .. counter)
end
