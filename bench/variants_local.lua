-- Local experiment mode: every request a distinct user (remote mode: always a vardata call).
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/experiment/variants?flag_keys=checkout-button,hero-banner,premium-upsell"
    .. "&user_properties.premium=true&track=false&user_id=local-" .. prefix .. "-" .. tid .. "-" .. counter)
end
