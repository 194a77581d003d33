-- The Braze burst: every request a distinct user with rec_id slowRecId, which the bench's
-- nginx upstream answers after 1 s (bench/saturation.py).
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/amplitude/recommendations?rec_id=slowRecId&user_id=burst-"
    .. prefix .. "-" .. tid .. "-" .. counter)
end
