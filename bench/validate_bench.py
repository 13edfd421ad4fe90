"""Benchmark (not a test): validate_file on a generated ~100 MB users CSV vs a bare csv.reader pass.

Run: python bench/validate_bench.py [--mb 100] [--keep DIR]
Prints MB/s for each pass, their ratio (the goal is validate >= 0.5 x csv.reader) and the peak RSS,
which should not grow with the file (run with --mb 20 and --mb 200 to see).
"""

from __future__ import annotations

import argparse
import csv
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.config import ImportsConfig, ImportType
from agent.imports.validate import validate_file

HEADER = ["accountId", "id", "email", "firstName", "lastName", "referable", "locale",
          "countryCode", "referredBy.code", "customFields.plan", "customFields.note"]


def generate(path: Path, target_bytes: int) -> int:
    rng = random.Random(4)
    locales = ["en_US", "fr_CA", "de_DE", "es_MX"]
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        while handle.tell() < target_bytes:
            for _ in range(1000):
                rows += 1
                user = f"u{rows:09d}"
                note = "multi\nline, \"quoted\" note" if rows % 97 == 0 else "plain note"
                writer.writerow([
                    f"acct-{rows // 3:08d}", user, f"{user}@example.com", "Ada", "Lovelace",
                    rng.choice(["true", "false", "TRUE"]), rng.choice(locales),
                    rng.choice(["CA", "US", "DE"]), f"REF{rng.randrange(10**6):06d}",
                    rng.choice(["free", "pro"]), note,
                ])
    return rows


def bare_pass(path: Path) -> int:
    count = 0
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        for _row in csv.reader(handle):
            count += 1
    return count - 1


def timed(label: str, size: int, func: object) -> tuple[float, object]:
    start = time.perf_counter()
    result = func()  # type: ignore[operator]
    seconds = time.perf_counter() - start
    print(f"{label:<22} {seconds:7.2f} s  {size / 1e6 / seconds:8.1f} MB/s")
    return seconds, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the generated file")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep the file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        path = folder / "users_bench.csv"
        rows = generate(path, int(args.mb * 1e6))
        size = path.stat().st_size
        print(f"file: {size / 1e6:.1f} MB, {rows:,} records")
        cfg = ImportsConfig(max_file_bytes=10**12, max_records=10**9)
        bare_pass(path)  # warm the page cache so both passes read from memory
        bare_s, bare_rows = timed("bare csv.reader", size, lambda: bare_pass(path))
        val_s, report = timed("validate_file", size,
                              lambda: validate_file(path, ImportType.USERS, cfg))
        assert bare_rows == rows, (bare_rows, rows)
        assert report.ok and report.records == rows, report.to_json()  # type: ignore[attr-defined]
        print(f"ratio (validate / bare speed): {bare_s / val_s:.2f} (goal >= 0.50)")
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(f"peak RSS: {peak_kib / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
