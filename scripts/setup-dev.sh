#!/usr/bin/env bash
# Install the agent with its demo and test extras into ./.venv (Debian/Ubuntu; sshd for the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v python3 >/dev/null; then
  echo "python3 (3.11 or newer) is required: apt-get install -y python3 python3-venv" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[dev]'
