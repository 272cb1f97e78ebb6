"""Durations for people, one way everywhere (the CLI's tables, the HTML report)."""

from __future__ import annotations


def fmt_duration(seconds: float | None, *, compact: bool = False) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 03 min``; ``-`` for none. ``compact`` (table cells
    in a narrow terminal): ``12s``, ``4m05s``, ``2h03m``."""
    if seconds is None:
        return "-"
    if seconds < 60 and not compact:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes == 0:
        return f"{secs}s"
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if compact else f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if compact else f"{hours} h {minutes:02d} min"
