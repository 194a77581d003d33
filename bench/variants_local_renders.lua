-- Local experiment mode as Braze sends: each user's message rendered 3 times (HTML, text, AMP).
dofile("bench/report.lua")
dofile("bench/ids.lua")
request = function()
  counter = counter + 1
  return wrk.format("GET", "/v1/experiment/variants?flag_keys=checkout-button,hero-banner,premium-upsell"
    .. "&user_properties.premium=true&track=false&user_id=local-" .. prefix .. "-" .. tid .. "-"
    .. math.floor((counter - 1) / 3))
end
