#!/usr/bin/env bash
# The benchmark in one command: installs wrk, nginx and its echo module (Debian) and the
# bench extra, then runs bench/run.py (bench/RESULTS.md top and bench/latency.png, about 90 s),
# bench/saturation.py (issue 15: fairness, open loop, misses on an nginx upstream; its section
# of RESULTS.md, about 8 minutes), bench/miss_cost.py (CPU per hit and per miss, about 2 minutes;
# `--compare DIR` puts another checkout beside it) and the two profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1 || ! command -v nginx >/dev/null 2>&1 \
    || [ ! -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # nginx-light: the bench starts its own nginx on a free loopback port (bench/saturation.py).
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk nginx-light libnginx-mod-http-echo >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[bench]'
.venv/bin/python bench/run.py "$@"
.venv/bin/python bench/saturation.py
.venv/bin/python bench/miss_cost.py
.venv/bin/python bench/profile_hit.py >/dev/null
.venv/bin/python bench/profile_miss.py >/dev/null
