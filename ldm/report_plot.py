"""``ldm-report``'s figure: one panel per metric against the swept key, one line per other varying param."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ldm.report import Row, _atomic, _value_key, varying_params


def plot(rows: Sequence[Row], x: str, series: str | None, metrics: Sequence[str], path: Path, title: str,
         *, logx: bool = False) -> Path:
    """One panel per metric against ``x``; one line per ``series`` value (and per other varying param)."""
    import matplotlib

    matplotlib.use("Agg")  # sweeps run on headless machines, where an interactive backend would fail
    from matplotlib.figure import Figure

    if not metrics:
        raise ValueError("no metrics to plot")
    rows = [r for r in rows if x in r.params]
    xs = list(dict.fromkeys(r.params[x] for r in rows))
    numeric = all(_value_key(v)[0] == 0 for v in xs)
    position = {v: float(v) if numeric else float(i) for i, v in enumerate(xs)}
    # Params varying besides x and series also split lines: merging them would average unlike configs.
    keys = ([series] if series else []) + [k for k in varying_params(rows) if k not in (x, series)]
    lines: dict[tuple[str, ...], list[Row]] = {}
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
    fig.suptitle(title)
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return Path(path)
