"""How the agent writes durations, byte counts and counted nouns for people (logs, views, reasons).

Times are written by `agent.store.journal.iso_utc` (ISO 8601, UTC, `Z`); log lines carry UTC with
a `Z` too (`agent.logs`).
"""

from __future__ import annotations


def human_duration(seconds: float) -> str:
    """`0.4 s`, `5.1 s`, `42 s`, `1 min 30 s`, `5 min`, `2 h 5 min`, `24 h`, `3 d 4 h`."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    whole = round(seconds)
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    if whole < 2 * 86400:
        hours, rest = divmod(whole, 3600)
        minutes = rest // 60
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, rest = divmod(whole, 86400)
    hours = rest // 3600
    return f"{days} d" + (f" {hours} h" if hours else "")


def human_bytes(count: float) -> str:
    """`512 B`, `1.5 KiB`, `12.3 MiB`, `1.02 GiB` (binary units, three significant digits)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            if unit == "B":
                return f"{value:.0f} B"
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 record`, `2 records`, `1,000 files` (thousands separated)."""
    return f"{number:,} {noun if number == 1 else plural or noun + 's'}"
