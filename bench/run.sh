#!/usr/bin/env bash
# The benchmark in one command: installs wrk (Debian) and the bench extra, then runs
# bench/run.py, which writes bench/RESULTS.md and bench/latency.png. About 90 seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v wrk >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[bench]'
.venv/bin/python bench/run.py "$@"
.venv/bin/python bench/profile_hit.py >/dev/null
.venv/bin/python bench/profile_miss.py >/dev/null
