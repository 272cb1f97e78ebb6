"""Durations for people, one way everywhere (the CLI's tables, the HTML report)."""

from __future__ import annotations


def fmt_duration(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``; ``-`` for none."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_duration_short(seconds: float | None) -> str:
    """``12s``, ``4m05s``, ``2h03m``; ``-`` for none: for table cells in a narrow terminal."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{round(seconds)}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
