"""The plots of ``ldm-report``: each metric against a swept param (``plot``), and the frontier of one metric
against another (``frontier_plot``: e.g. accuracy against FID), one line per value of a series param (e.g. the
guidance method), its points ordered by the swept param (e.g. the scale).

A trade-off such as classifier-free guidance's (condition following bought with diversity) is read from the
frontier, not from either metric alone: a method is better where its line lies beyond another's.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot(rows: Sequence[Any], x: str, series: str | None, metrics: Sequence[str], path: Path, title: str,
         *, logx: bool = False) -> Path:
    """One panel per metric against ``x``; one line per ``series`` value (and per other varying param)."""
    import matplotlib

    matplotlib.use("Agg")  # sweeps run on headless machines, where an interactive backend would fail
    from matplotlib.figure import Figure

    from ldm.report import _atomic, _value_key, varying_params

    if not metrics:
        raise ValueError("no metrics to plot")
    rows = [r for r in rows if x in r.params]
    xs = list(dict.fromkeys(r.params[x] for r in rows))
    numeric = all(_value_key(v)[0] == 0 for v in xs)
    position = {v: float(v) if numeric else float(i) for i, v in enumerate(xs)}
    # Params varying besides x and series also split lines: merging them would average unlike configs.
    keys = ([series] if series else []) + [k for k in varying_params(rows) if k not in (x, series)]
    lines: dict[tuple[str, ...], list[Any]] = {}
    for r in rows:
        lines.setdefault(tuple(r.params.get(k, "—") for k in keys), []).append(r)
    ncols, nrows = min(len(metrics), 3), math.ceil(len(metrics) / 3)
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows + 0.4), layout="constrained")
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for j, (label, members) in enumerate(lines.items()):
            pts = sorted(((position[r.params[x]], r.metrics[metric]) for r in members if metric in r.metrics),
                         key=lambda pt: pt[0])  # Stats do not compare; a tie on x must not reach them
            if not pts:
                continue
            errs = [s.std or 0.0 for _, s in pts]
            name = ", ".join(f"{k}={v}" if len(keys) > 1 else v for k, v in zip(keys, label)) or None
            ax.errorbar([p for p, _ in pts], [s.mean for _, s in pts], yerr=errs if any(errs) else None,
                        marker="o", capsize=3, label=name, color=f"C{j % 10}")  # one colour per line in every panel
        if numeric and logx and all(p > 0 for p in position.values()):
            ax.set_xscale("log")
        if not numeric or len(xs) <= 12:  # ticks at the swept values read better than 10^1, 10^2
            ax.set_xticks(list(position.values()), xs)
            ax.minorticks_off()
        ax.set(xlabel=x, ylabel=metric, title=metric)
        ax.grid(alpha=0.3)
        if len(lines) > 1 and i == 0:
            ax.legend(title=keys[0] if len(keys) == 1 else None, fontsize="small")
    fig.suptitle(textwrap.fill(title, 70))  # a study's title is a sentence: wrapped, not cut at the edges
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return Path(path)


def frontier_plot(rows: Sequence[Any], x_metric: str, y_metric: str, series: str | None, along: str | None,
                  path: Path, title: str, *, lower_x_is_better: bool = True) -> Path:
    """rows: ``ldm.report.Row``s; points with both metrics are drawn, mean ± std over seeds on both axes and
    labelled with ``along``'s value (the scale); lines join a series' points in ``along``'s order."""
    import matplotlib

    matplotlib.use("Agg")  # sweeps run on headless machines
    from matplotlib.figure import Figure

    from ldm.report import _atomic, _value_key

    lines: dict[str, list[Any]] = {}
    for r in rows:
        if x_metric in r.metrics and y_metric in r.metrics:
            lines.setdefault(r.params.get(series, "—") if series else "all", []).append(r)
    if not lines:
        raise ValueError(f"no job reports both {x_metric} and {y_metric}: no frontier to draw")
    fig = Figure(figsize=(6.0, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for j, (label, members) in enumerate(lines.items()):
        if along:
            members = sorted(members, key=lambda r: _value_key(r.params.get(along, "")))
        xs = [r.metrics[x_metric] for r in members]
        ys = [r.metrics[y_metric] for r in members]
        ax.errorbar([s.mean for s in xs], [s.mean for s in ys], xerr=[s.std or 0.0 for s in xs],
                    yerr=[s.std or 0.0 for s in ys], marker="o", capsize=3, color=f"C{j % 10}",
                    label=label if series else None)
        if along:
            for r, x, y in zip(members, xs, ys):
                ax.annotate(r.params.get(along, ""), (x.mean, y.mean), textcoords="offset points", xytext=(4, 4),
                            fontsize="x-small", color=f"C{j % 10}")
    ax.set(xlabel=x_metric + (" (lower is better)" if lower_x_is_better else ""), ylabel=y_metric,
           title=f"{y_metric} vs {x_metric}" + (f" (labels: {along})" if along else ""))
    ax.grid(alpha=0.3)
    if series:
        ax.legend(title=series, fontsize="small")
    fig.suptitle(textwrap.fill(title, 70))  # a study's title is a sentence: wrapped, not cut at the edges
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return Path(path)
