"""Numbers and durations as people read them in logs and reports."""

from __future__ import annotations


def fmt_s(seconds: float | None) -> str:
    """``12.3 s``, ``4 min 05 s``, ``1 h 02 min``; ``–`` for None."""
    if seconds is None:
        return "–"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


def si(value: float | None, digits: int = 3) -> str:
    """3 significant digits with a decimal suffix: 1.23 M, 456 k, 12.3 G."""
    if value is None:
        return "–"
    v = float(value)

    def fmt(x: float) -> str:  # never scientific notation: 587, 12.3, 0.25
        return f"{x:.0f}" if abs(x) >= 10 ** (digits - 1) else f"{x:.{digits}g}"

    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{fmt(v / div)} {suffix}"
    return fmt(v)


def pct(v: float | None) -> str:
    """A percentage with two decimals, ``–`` for None."""
    return "–" if v is None else f"{v:.2f}"


def few(names, most: int = 3) -> str:
    """The first `most` of `names`, comma-separated, then "and N more": an error line stays one line."""
    names = list(names)
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(str(n) for n in names[:most]) + more


__all__ = ["few", "fmt_s", "pct", "si"]
