"""The example file of each import type (config/examples/, shown in README) is one `validate`
accepts, as the type README says, and README lists each type's required columns (issue 15)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from agent.config import ImportType
from agent.imports.rules import REQUIRED
from agent.imports.types import JOB_TYPES

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "config" / "examples"
EXPECTED = {
    "users_example.csv": ImportType.USERS,
    "userEvents_example.csv": ImportType.USER_EVENTS,
    "userEvents_example.jsonl": ImportType.USER_EVENTS,
    "deleteUsers_example.csv": ImportType.DELETE_USERS,
    "rewardRedemptions_example.csv": ImportType.REWARD_REDEMPTIONS,
}


def test_validate_accepts_every_example_as_its_type() -> None:
    files = sorted(EXAMPLES.iterdir())
    assert [path.name for path in files] == sorted(EXPECTED)
    assert {EXPECTED[path.name] for path in files} == set(ImportType)  # one of each type at least
    result = subprocess.run([sys.executable, "-m", "agent", "validate", "--json", *map(str, files)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    for report in json.loads(result.stdout):
        expected = EXPECTED[report["name"]]
        assert report["valid"] and report["action"] == "upload", report
        assert report["import_type"] == expected.value and report["job_type"] == JOB_TYPES[expected]
        assert report["error_count"] == 0 and report["records"] >= 2, report


def test_each_example_is_three_lines_with_the_required_columns() -> None:
    for name, import_type in EXPECTED.items():
        lines = (EXAMPLES / name).read_text().splitlines()
        assert len(lines) == 3, name
        if name.endswith(".csv"):
            header = lines[0].split(",")
            assert set(REQUIRED[import_type]) <= set(header), (name, header)


def test_readme_shows_each_example_and_the_required_columns() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Import file types"):readme.index("## Following a file after upload")]
    for name in EXPECTED:
        assert (EXAMPLES / name).read_text() in section, f"README does not show {name} as shipped"
    for import_type, job_type in JOB_TYPES.items():
        heading = re.search(rf"^### .*\(`{re.escape(job_type)}`\).*$", section, re.MULTILINE)
        assert heading, job_type
        body = section[heading.end():]
        body = body[:body.index("\n### ")] if "\n### " in body else body
        required = ", ".join(f"`{field}`" for field in REQUIRED[import_type])
        assert f"- **Required**: {required}" in body, (job_type, required)
