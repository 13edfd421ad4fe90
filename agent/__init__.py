"""saasquatch-agent.

paramiko imports `invoke`, when it is installed, only to run `Match exec` lines of OpenSSH client
configuration files, which the agent never reads; the import alone costs 45-90 ms of CPU at every
start (bench/RESULTS.md, round 4). It is blocked here, before any module of the agent imports
paramiko, unless something in this process has imported invoke already.
"""

import sys

if "invoke" not in sys.modules:
    sys.modules["invoke"] = None  # type: ignore[assignment]  # `import invoke` raises ImportError
