"""Server-side SVG charts for the dashboard: no JavaScript library, nothing fetched at run time.

    line_chart(series, start=t0, step=60, y_format=percent)    # one line per route
    bar_chart(labels, stacks, y_format=usd)                      # stacked bars (spend per day)

Every value that reaches the markup is escaped; numbers are formatted here, so a route id with
markup in it cannot break out of an attribute. Gaps (None: no traffic in a bucket) break a line
instead of drawing it to zero, because "no data" and "0% uptime" are different facts.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563")
WIDTH, HEIGHT = 640, 200
PAD_L, PAD_R, PAD_T, PAD_B = 70, 12, 12, 28


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[float | None]  # one per x step; None = no data


def percent(value: float) -> str:
    return f"{value * 100:.0f}%"


def millis(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.0f} s"


def plain(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def usd(value: float) -> str:
    if value == 0:
        return "$0"
    return f"${value:,.2f}" if abs(value) >= 1 else f"${value:.6f}".rstrip("0")


def _nice_max(value: float) -> float:
    if value <= 0 or not math.isfinite(value):
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _time_label(t: float, step: float) -> str:
    fmt = "%m-%d" if step >= 3600 else "%H:%M"
    return time.strftime(fmt, time.gmtime(t))


def _frame(
    y_max: float, y_format: Callable[[float], str], x_labels: list[tuple[float, str]]
) -> str:
    out = []
    plot_h = HEIGHT - PAD_T - PAD_B
    for i in range(5):
        y = PAD_T + plot_h * i / 4
        value = y_max * (4 - i) / 4
        out.append(
            f"<line x1='{PAD_L}' x2='{WIDTH - PAD_R}' y1='{y:.1f}' y2='{y:.1f}' class='grid'/>"
            f"<text x='{PAD_L - 6}' y='{y + 4:.1f}' text-anchor='end'>"
            f"{html.escape(y_format(value))}</text>"
        )
    for n, (x, label) in enumerate(x_labels):
        # the outer labels lean inwards so the plot's edges do not cut them
        anchor = "middle"
        if len(x_labels) > 1 and x - PAD_L < 20:
            anchor = "start"
        elif len(x_labels) > 1 and n == len(x_labels) - 1 and WIDTH - PAD_R - x < 20:
            anchor = "end"
        out.append(
            f"<text x='{x:.1f}' y='{HEIGHT - 8}' text-anchor='{anchor}'>{html.escape(label)}</text>"
        )
    return "".join(out)


def _legend(names: Sequence[str]) -> str:
    items = "".join(
        f"<span class='key'><i style='background:{PALETTE[i % len(PALETTE)]}'></i>"
        f"{html.escape(name)}</span>"
        for i, name in enumerate(names)
    )
    return f"<div class='legend'>{items}</div>"


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    start: float,
    step: float,
    y_format: Callable[[float], str] = plain,
    y_max: float | None = None,
) -> str:
    """A figure with one polyline per series over equally spaced buckets from `start`."""
    count = max((len(s.values) for s in series), default=0)
    present = [v for s in series for v in s.values if v is not None and math.isfinite(v)]
    top = y_max if y_max is not None else _nice_max(max(present, default=0.0))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B

    def x_of(i: int) -> float:
        return PAD_L + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)

    def y_of(v: float) -> float:
        return PAD_T + plot_h * (1 - min(max(v / top, 0.0), 1.0))

    ticks = [0, count // 2, count - 1] if count > 2 else list(range(count))
    x_labels = [(x_of(i), _time_label(start + i * step, step)) for i in ticks]
    lines = []
    for n, s in enumerate(series):
        color = PALETTE[n % len(PALETTE)]
        run: list[str] = []
        runs: list[list[str]] = []
        for i, v in enumerate(s.values):
            if v is None or not math.isfinite(v):
                if run:
                    runs.append(run)
                run = []
                continue
            run.append(f"{x_of(i):.1f},{y_of(v):.1f}")
        if run:
            runs.append(run)
        for points in runs:
            if len(points) == 1:  # a lone bucket: a dot, or it would not show at all
                x, y = points[0].split(",")
                lines.append(f"<circle cx='{x}' cy='{y}' r='2.5' fill='{color}'/>")
            else:
                lines.append(
                    f"<polyline fill='none' stroke='{color}' stroke-width='1.8' "
                    f"points='{' '.join(points)}'/>"
                )
    empty = (
        ""
        if present
        else (
            f"<text x='{WIDTH / 2}' y='{HEIGHT / 2}' text-anchor='middle' class='empty'>"
            "no data</text>"
        )
    )
    svg = (
        f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label='{html.escape(title)}' "
        f"data-points='{len(present)}'>{_frame(top, y_format, x_labels)}{''.join(lines)}{empty}"
        "</svg>"
    )
    names = [s.name for s in series]
    return f"<figure class='chart'><figcaption>{html.escape(title)}</figcaption>{svg}" + (
        _legend(names) + "</figure>"
    )


def bar_chart(
    title: str,
    labels: Sequence[str],
    stacks: Sequence[Series],
    *,
    y_format: Callable[[float], str] = usd,
) -> str:
    """Stacked bars: one bar per label, one coloured part per series."""
    totals = [
        sum(v or 0.0 for v in (s.values[i] if i < len(s.values) else None for s in stacks))
        for i in range(len(labels))
    ]
    top = _nice_max(max(totals, default=0.0))
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    slot = plot_w / max(len(labels), 1)
    bars = []
    for i, label in enumerate(labels):
        x = PAD_L + i * slot + slot * 0.15
        base = 0.0
        for n, s in enumerate(stacks):
            v = s.values[i] if i < len(s.values) else None
            if not v or v <= 0:
                continue
            y0, y1 = plot_h * (1 - base / top), plot_h * (1 - (base + v) / top)
            bars.append(
                f"<rect x='{x:.1f}' y='{PAD_T + y1:.1f}' width='{slot * 0.7:.1f}' "
                f"height='{max(y0 - y1, 0.5):.1f}' fill='{PALETTE[n % len(PALETTE)]}'>"
                f"<title>{html.escape(f'{s.name} {label}: {y_format(v)}')}</title></rect>"
            )
            base += v
    x_labels = [(PAD_L + (i + 0.5) * slot, label) for i, label in enumerate(labels)]
    svg = (
        f"<svg viewBox='0 0 {WIDTH} {HEIGHT}' role='img' aria-label='{html.escape(title)}' "
        f"data-bars='{len(bars)}'>{_frame(top, y_format, x_labels)}{''.join(bars)}</svg>"
    )
    return (
        f"<figure class='chart'><figcaption>{html.escape(title)}</figcaption>{svg}"
        f"{_legend([s.name for s in stacks])}</figure>"
    )
