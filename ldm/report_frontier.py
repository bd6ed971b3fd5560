"""The frontier plot of ``ldm-report``: one metric against another (e.g. accuracy against FID), one line per
value of a series param (e.g. the guidance method), its points ordered by the swept param (e.g. the scale).

A trade-off such as classifier-free guidance's (condition following bought with diversity) is read from the
frontier, not from either metric alone: a method is better where its line lies beyond another's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    fig.suptitle(title)
    _atomic(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return Path(path)
