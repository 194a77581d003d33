-- The sandbox upstream alone, distinct users, as the proxy calls it on a miss.
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/userprofile?get_recs=true&rec_id=testRecId&user_id=up-"
    .. prefix .. "-" .. tid .. "-" .. counter)
end
