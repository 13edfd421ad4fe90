#!/usr/bin/env bash
# Run the whole test suite: lint, types, then pytest (needs OpenSSH's sshd; run as root for chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || scripts/setup-dev.sh
if ! command -v sshd >/dev/null && [ ! -x /usr/sbin/sshd ]; then
  echo "OpenSSH sshd is needed by the tests: apt-get install -y openssh-server" >&2
  exit 2
fi
.venv/bin/ruff check agent tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
