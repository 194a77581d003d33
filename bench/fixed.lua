-- The URL given on the command line, as is.
dofile("bench/report.lua")
