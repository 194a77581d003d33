-- Shared by the bench scripts: print one JSON line of results for bench/run.py.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"rps":%.2f,"p50_ms":%.3f,"p99_ms":%.3f,"p75_ms":%.3f,"p999_ms":%.3f,"max_ms":%.3f,"errors":%d,"non_2xx":%d,"timeouts":%d}\n',
    summary.requests, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency:percentile(75) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000,
    e.connect + e.read + e.write + e.timeout, e.status, e.timeout))
end
