"""The benchmarks' result table: medians of repeated measurements and their ratio to a baseline row."""

from __future__ import annotations

import statistics


def median_table(title: str, values: dict[str, list[float]], *, base: str, unit: str, faster: str = "higher") -> None:
    """Print one row per case: the median of its values and ``median / base`` (``faster="higher"``, e.g. tokens/s)
    or ``base / median`` (``faster="lower"``, e.g. seconds), so a ratio above 1 is always faster than ``base``."""
    ref = statistics.median(values[base])
    print(f"\n{title}")
    print(f"| {'case':<22} | {unit:>12} | {'ratio vs ' + base:>22} |")
    print(f"|{'-' * 24}|{'-' * 14}|{'-' * 24}|")
    for name, measured in values.items():
        med = statistics.median(measured)
        ratio = med / ref if faster == "higher" else ref / med
        print(f"| {name:<22} | {med:12.2f} | {ratio:22.3f} |")
