"""The tables of bench/overhead.py's report (docs/benchmarks.md, overhead section)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _f(value: float | None, unit: str = " ms", digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}{unit}"


def render_sequential(title: str, rows: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    direct = rows["direct"]
    out = [
        f"**{title}**",
        "",
        "| target | p50 | p99 | added p50 | added, median of pairs | first byte added p50 "
        "| own time (header) p50 | CPU per request |",
        "|---|---|---|---|---|---|---|---|",
        f"| direct | {_f(direct['p50'])} | {_f(direct['p99'])} | | | | | |",
    ]
    for name in names:
        r = rows[name]
        out.append(
            f"| {name} | {_f(r['p50'])} | {_f(r['p99'])} | **{_f(r['p50'] - direct['p50'])}** "
            f"| {_f(r['paired_added_p50'])} | {_f(r['first_p50'] - direct['first_p50'])} "
            f"| {_f(r['own_p50'], digits=3)} | **{_f(r['cpu_ms'], digits=3)}** |"
        )
    return [*out, ""]


def render_concurrent(title: str, rows: dict[str, dict[str, float]], names: list[str]) -> list[str]:
    out = [
        f"**{title}**",
        "",
        "| target | req/s | x direct | p50 | p99 | CPU per request | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["direct", *names]:
        r = rows[name]
        out.append(
            f"| {name} | **{r['rps']:.0f}** | {r['rps'] / rows['direct']['rps']:.2f} "
            f"| {_f(r['p50'])} | {_f(r['p99'])} | {_f(r.get('cpu_ms'), digits=3)} "
            f"| {r['errors']:.0f} |"
        )
    return [*out, ""]
