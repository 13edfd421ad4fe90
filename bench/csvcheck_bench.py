"""Benchmark (not a test): CPU of validate_file(digest=sha256) on three CSV shapes, 3 runs each.

Run: python bench/csvcheck_bench.py [--folder DIR] [--agent-root DIR]
Files (made once in --folder, default /tmp/csvbench): users_large.csv (bench.run.make_large_file,
100 MB, 272,000 records of ~370 bytes), users_short.csv (1,000,000 records `acct-N,uN,uN@example.com`)
and users_quoted.csv (users_large with every value quoted: csvcheck.FastRows falls back to the csv
module at once). --agent-root runs another copy of the `agent` package (e.g. `git archive` of an
older commit) for before/after numbers. Prints CPU seconds (time.process_time): min and median.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_files(folder: Path) -> list[Path]:
    sys.path.insert(0, str(ROOT))
    from bench.run import make_large_file

    large = folder / "users_large.csv"
    if not large.exists():
        make_large_file(folder, 100)
    short = folder / "users_short.csv"
    if not short.exists():
        with short.open("w", encoding="utf-8", newline="") as handle:
            handle.write("accountId,id,email\n")
            handle.writelines(f"acct-{n},u{n},u{n}@example.com\n" for n in range(1_000_000))
    quoted = folder / "users_quoted.csv"
    if not quoted.exists():
        with large.open(encoding="utf-8", newline="") as source, \
                quoted.open("w", encoding="utf-8", newline="") as target:
            csv.writer(target, quoting=csv.QUOTE_ALL).writerows(csv.reader(source))
    return [large, short, quoted]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/csvbench"))
    parser.add_argument("--agent-root", type=Path, default=ROOT, help="folder holding `agent/`")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    paths = make_files(args.folder)
    sys.path.insert(0, str(args.agent_root.resolve()))
    for name in [n for n in sys.modules if n == "agent" or n.startswith("agent.")]:
        del sys.modules[name]
    import agent.imports.csvcheck as csvcheck
    from agent.imports.types import FileFormat, ImportType
    from agent.imports.validate import validate_file

    print(f"agent: {Path(csvcheck.__file__).parent.parent.parent}")
    for path in paths:
        times = []
        for _ in range(3):
            start = time.process_time()
            report = validate_file(path, ImportType.USERS, fmt=FileFormat.CSV, digest=hashlib.sha256())
            times.append(time.process_time() - start)
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"{path.name:<18} {path.stat().st_size / 1e6:6.1f} MB {report.records:>9,} records "
              f"ok={report.ok}  CPU min {min(times):.3f} s  median {statistics.median(times):.3f} s ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
