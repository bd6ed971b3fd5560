"""``ldm-report``: compile a Hydra multirun sweep (or a W&B group) into results.md, results.png, results.json.

    ldm-report multirun/2024-06-01/12-00-00 --x sampler.steps --series sampler --lower-is-better fid --logx
    ldm-report wandb:me/ldm/steps-sweep --out reports/steps --x sampler.steps

Each job folder holds ``.hydra/overrides.yaml`` (what Hydra varied) and ``results.json`` (metric -> number).
Jobs differing only in the seed are averaged into one row with mean ± sample std and the number of seeds:
a single seed's number alone overstates what is known.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ldm.cli import FAILED_MARKER


@dataclass
class Job:
    """One job: its folder (or W&B run path), overrides as key -> value string, numeric metrics."""

    dir: str
    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    missing: bool = False
    note: str = ""  # why a job counts as missing, when it is more than "no results.json"


@dataclass
class Stat:
    mean: float
    std: float | None  # None for a single value: a std of 0 would claim a precision nobody measured
    n: int


@dataclass
class Row:
    """One configuration: the jobs sharing every param except the seed."""

    params: dict[str, str]
    metrics: dict[str, Stat]
    n: int
    dirs: list[str]


def parse_override(text: str) -> tuple[str, str]:
    """``+foo=bar`` / ``++foo=bar`` -> (foo, bar): the prefixes say how Hydra merged it, not what it is."""
    key, _, value = str(text).partition("=")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key.strip().lstrip("+"), value


def _numeric_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    # bool is an int subclass, but True is a flag, not a measurement.
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _natural(text: str) -> list[Any]:
    # Job folders are 0, 1, ..., 10: plain string order would put 10 before 2.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def collect(root: Path) -> list[Job]:
    """Every folder below ``root`` with ``.hydra/overrides.yaml`` is a job; no results.json means missing."""
    root = Path(root)
    jobs = []
    for overrides in sorted(root.rglob(".hydra/overrides.yaml"), key=lambda p: _natural(str(p))):
        job_dir = overrides.parent.parent
        try:
            items = yaml.safe_load(overrides.read_text()) or []
        except yaml.YAMLError as e:
            raise ValueError(f"{overrides}: not valid YAML ({e})") from e
        job = Job(dir=str(job_dir), params=dict(parse_override(o) for o in items))
        result = job_dir / "results.json"
        try:
            data = json.loads(result.read_text()) if result.is_file() else None
            if not isinstance(data, dict | None):
                raise ValueError("not a JSON object")
            job.missing, job.metrics = data is None, _numeric_metrics(data or {})
        except ValueError as e:  # a job killed mid-write must not take the report down with it
            job.missing, job.note = True, f"unreadable results.json: {e}"
        if job.missing and (job_dir / FAILED_MARKER).is_file():  # ldm-train wrote why the job stopped
            job.note = "failed: " + (job_dir / FAILED_MARKER).read_text().strip()
        jobs.append(job)
    return jobs


def _value_key(value: str) -> tuple[int, float, str]:
    try:
        number = float(value)
    except ValueError:
        return (1, 0.0, value)
    # NaN compares false with everything and would scramble the sort; "inf"/"nan" sort as words.
    return (0, number, "") if math.isfinite(number) else (1, 0.0, value)


def _param_order(jobs: Iterable[Job | Row]) -> list[str]:
    # First-seen order follows the sweep command line, which is the order its author thinks in.
    return list(dict.fromkeys(k for job in jobs for k in job.params))


def _rank(value: str | None, listed: Sequence[str]) -> tuple[int, int, tuple[int, float, str]]:
    # Unset (a key only some jobs set) < listed in `order`, by position < the rest, numbers before words.
    if value is None:
        return (-1, 0, (0, 0.0, ""))
    return (0, listed.index(value), (0, 0.0, "")) if value in listed else (1, 0, _value_key(value))


def summarize(jobs: Sequence[Job], seed_key: str = "seed",
              order: Mapping[str, Sequence[Any]] | None = None) -> list[Row]:
    """Average finished jobs over seeds; rows sorted by params, numbers numerically, ``order`` first."""
    groups: dict[tuple[tuple[str, str], ...], list[Job]] = {}
    for job in jobs:
        if not job.missing:
            key = tuple(sorted((k, v) for k, v in job.params.items() if k != seed_key))
            groups.setdefault(key, []).append(job)
    rows = []
    for members in groups.values():
        stats = {}
        for metric in dict.fromkeys(m for j in members for m in j.metrics):
            values = [j.metrics[metric] for j in members if metric in j.metrics]
            std = statistics.stdev(values) if len(values) > 1 else None
            stats[metric] = Stat(statistics.fmean(values), std, len(values))
        params = {k: v for k, v in members[0].params.items() if k != seed_key}  # command-line order
        rows.append(Row(params, stats, len(members), [j.dir for j in members]))
    explicit = {k: [str(v) for v in vals] for k, vals in (order or {}).items()}
    keys = _param_order(rows)
    return sorted(rows, key=lambda r: [_rank(r.params.get(k), explicit.get(k, [])) for k in keys])


def varying_params(rows: Sequence[Row]) -> list[str]:
    """Params that tell rows apart; the rest is the same everywhere and belongs in the "Fixed" line."""
    return [k for k in _param_order(rows) if len({r.params.get(k) for r in rows}) > 1]


def constant_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """Metrics with one value in every row and every seed (``batch/world_size``): a column that compares
    nothing. A lone job has nothing to compare, so nothing of it counts as constant."""
    if len(rows) < 2 and all(r.n < 2 for r in rows):
        return {}
    out = {}
    for m in all_metrics(rows):
        stats = [r.metrics.get(m) for r in rows]
        if all(s is not None and s.mean == stats[0].mean and not s.std for s in stats):
            out[m] = stats[0].mean
    return out


def default_x(rows: Sequence[Row]) -> str | None:
    """The swept key to plot against when none is named: the varying param with the most values, a numeric
    one first (guidance_scale over sampler); the other varying params become lines."""
    varying = varying_params(rows)
    if not varying:
        return None

    def score(key: str) -> tuple[int, int]:
        values = {r.params.get(key) for r in rows if key in r.params}
        return (all(_value_key(v)[0] == 0 for v in values), len(values))

    return max(varying, key=lambda k: (score(k), -varying.index(k)))


def fixed_params(jobs: Sequence[Job]) -> dict[str, str]:
    """Params set to one value in every finished job (a lone seed included)."""
    done = [j for j in jobs if not j.missing]
    return {k: done[0].params[k] for k in _param_order(done) if len({j.params.get(k) for j in done}) == 1}


def fmt(value: float, sig: int = 4) -> str:
    """``sig`` significant digits, plain notation where readable, no trailing zeros (12.3, not 12.30)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    if -4 <= exponent < 6:
        text = f"{value:.{max(0, sig - 1 - exponent)}f}"
        return text.rstrip("0").rstrip(".") if "." in text else text
    return f"{value:.{sig - 1}e}"


def _cell(stat: Stat | None, row_n: int, bold: bool) -> str:
    if stat is None:
        return "—"
    text = fmt(stat.mean) if stat.std is None else f"{fmt(stat.mean)} ± {fmt(stat.std, 2)}"
    text = f"**{text}**" if bold else text
    # A metric only some seeds logged is averaged over fewer of them; say so rather than hide it.
    return f"{text} (n={stat.n})" if stat.n != row_n else text


def all_metrics(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(m for r in rows for m in r.metrics))


def markdown_table(rows: Sequence[Row], metrics: Sequence[str] | None = None, *,
                   lower_is_better: Collection[str] = (), params: Sequence[str] | None = None) -> str:
    """Varying params, a "seeds" column where any row averages several, then metrics; best in bold.

    A metric is better when lower if listed in ``lower_is_better``, when higher otherwise.
    """
    metrics = list(metrics) if metrics is not None else all_metrics(rows)
    params = list(params) if params is not None else varying_params(rows)
    seeds = any(r.n > 1 for r in rows)
    best: dict[str, float] = {}
    for m in metrics:
        values = [r.metrics[m].mean for r in rows if m in r.metrics and not math.isnan(r.metrics[m].mean)]
        if len(values) > 1:  # one value beats nothing
            best[m] = min(values) if m in lower_is_better else max(values)
    header = [*params, *(["seeds"] if seeds else []), *metrics]
    align = ["---"] * len(params) + ["---:"] * (len(header) - len(params))  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = [r.params.get(k, "—") for k in params] + ([str(r.n)] if seeds else [])
        cells += [_cell(r.metrics.get(m), r.n, m in r.metrics and r.metrics[m].mean == best.get(m)) for m in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    # A reader (or a crash) never sees a half-written report: the old file stays until the new one is whole.
    from ldm.io.export import atomic_path

    with atomic_path(path) as tmp:
        write(tmp)


def _clean(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity; a diverged run's NaN becomes null rather than an unparsable file.
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(root: Path | str, out_dir: Path | str, *, title: str, x: str | None = None,
                 series: str | None = None, metrics: Sequence[str] | None = None,
                 lower_is_better: Collection[str] = (), logx: bool = False,
                 order: Mapping[str, Sequence[Any]] | None = None, seed_key: str = "seed", notes: str = "",
                 jobs: Sequence[Job] | None = None, frontier: Sequence[str] | None = None) -> dict[str, Any]:
    """Write results.md, results.json and (given ``x``) results.png; ``jobs`` skips collecting ``root``.
    ``frontier`` = (x metric, y metric): also results_frontier.png (ldm.report_frontier), one line per series."""
    out_dir = Path(out_dir)
    if (out_dir / ".hydra" / "overrides.yaml").exists():
        raise ValueError(f"{out_dir} is a job folder: the report would overwrite its results.json; use --out")
    jobs = list(jobs) if jobs is not None else collect(Path(root))
    done = [j for j in jobs if not j.missing]
    if not done:
        raise ValueError(f"no finished jobs under {root} ({len(jobs)} jobs found): expected one folder per job "
                         "holding .hydra/overrides.yaml and results.json")
    rows = summarize(jobs, seed_key=seed_key, order=order)
    # Unless the columns are named, a metric equal in every row goes to one "Constant" line, not a column.
    constant = {} if metrics else constant_metrics(rows)
    metrics = list(metrics) if metrics else [m for m in all_metrics(rows) if m not in constant]
    unknown = [m for m in metrics if m not in all_metrics(rows)]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; the jobs report {all_metrics(rows)}")
    for name, key in (("x", x), ("series", series)):
        if key is not None and not any(key in r.params for r in rows):
            raise ValueError(f"{name}={key!r} is not a param of these jobs (params: {_param_order(done)})")
    fixed = fixed_params(jobs)
    missing = [j for j in jobs if j.missing]
    table = markdown_table(rows, metrics, lower_is_better=lower_is_better)
    rel = (lambda d: os.path.relpath(d, root)) if Path(root).is_dir() else str
    spread = f", mean ± sample std over `{seed_key}`" if any(r.n > 1 for r in rows) else ""
    counts = f"{len(jobs)} jobs under `{root}`: {len(done)} finished, {len(missing)} missing; {len(rows)} configurations"
    parts = [f"# {title}", counts + spread + ".", table]
    if fixed:
        parts.append("Fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    if constant:
        parts.append("Same in every row: " + ", ".join(f"{k} {fmt(v)}" for k, v in constant.items()))
    lower = sorted(set(lower_is_better) & set(metrics))
    # Direction comes from the caller; stating it lets a reader catch a bolded worst value.
    lower_text = f"lower is better: {', '.join(lower)}; " if lower else ""
    parts.append(f"Bold: best per metric ({lower_text}higher is better otherwise).")
    if missing:
        listed = [f"- `{rel(j.dir)}`" + (f" ({', '.join(f'{k}={v}' for k, v in j.params.items())})" if j.params
                  else "") + (f": {j.note}" if j.note else "") for j in missing]
        parts.append(f"## Missing results ({len(missing)} of {len(jobs)} jobs)\n\n" + "\n".join(listed))
    png = None
    if x is not None:
        from ldm.report_plots import plot

        png = plot(rows, x, series, metrics, out_dir / "results.png", title, logx=logx)
        parts.append("![](results.png)")
    if frontier:
        from ldm.report_plots import frontier_plot

        fx, fy = frontier
        frontier_plot(rows, fx, fy, series, x, out_dir / "results_frontier.png", title,
                      lower_x_is_better=fx in lower_is_better)
        parts.append("![](results_frontier.png)")
    if notes:
        parts.append(notes.strip())
    md = "\n\n".join(parts) + "\n"
    md_path, json_path = out_dir / "results.md", out_dir / "results.json"
    payload = {"title": title, "source": str(root), "jobs": len(jobs), "finished": len(done), "fixed": fixed,
               "missing": [j.dir for j in missing], "rows": [asdict(r) for r in rows]}
    _atomic(json_path, lambda tmp: tmp.write_text(json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n"))
    _atomic(md_path, lambda tmp: tmp.write_text(md))
    return {"markdown": md_path, "json": json_path, "plot": png, "rows": rows, "table": table, "fixed": fixed}


def _csv(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _order_arg(text: str) -> tuple[str, list[str]]:
    key, sep, values = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=V1,V2, got {text!r}")
    return key, _csv(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ldm-report", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="sweep folder, or wandb:[entity/]project/group")
    parser.add_argument("--out", help="output folder (default: the sweep folder; required for wandb:)")
    parser.add_argument("--title", help="report heading (default: the source's name)")
    parser.add_argument("--x", help="param on the plot's x axis (default: the swept param with the most values)")
    parser.add_argument("--no-plot", action="store_true", help="the table only")
    parser.add_argument("--series", help="param drawn as one line per value")
    parser.add_argument("--metrics", help="comma-separated metrics, in column order (default: all)")
    parser.add_argument("--lower-is-better", default="", help="comma-separated metrics where lower is better")
    parser.add_argument("--logx", action="store_true", help="log-scale x axis")
    parser.add_argument("--frontier", help="X_METRIC,Y_METRIC: also a frontier plot (e.g. fid,accuracy)")
    parser.add_argument("--seed-key", default="seed", help="param averaged over (default: seed)")
    parser.add_argument("--order", action="append", default=[], metavar="KEY=V1,V2", type=_order_arg,
                        help="explicit row order for a param's values (repeatable)")
    args = parser.parse_args(argv)
    try:
        order = dict(args.order)
        if args.source.startswith("wandb:"):
            if not args.out:
                raise ValueError("--out is required for a wandb: source")
            root = args.source[len("wandb:"):]
            from ldm.report_wandb import collect_wandb

            try:
                jobs = collect_wandb(root)
            except Exception as e:  # W&B raises its own types (no login, no network, no such project)
                raise ValueError(f"cannot read W&B runs of {root!r}: {e}") from e
            default_title = root
        else:
            if not Path(args.source).is_dir():
                raise ValueError(f"{args.source} is not a folder (nor wandb:entity/project/group)")
            root, jobs, default_title = args.source, None, Path(args.source).resolve().name
        x = args.x
        if x is None and not args.no_plot:
            rows = summarize(jobs if jobs is not None else collect(Path(root)), seed_key=args.seed_key)
            x = default_x(rows)
        result = write_report(
            root, args.out or args.source, title=args.title or default_title, x=None if args.no_plot else x,
            series=args.series, metrics=_csv(args.metrics) or None, lower_is_better=set(_csv(args.lower_is_better)),
            logx=args.logx, order=order, seed_key=args.seed_key, jobs=jobs, frontier=_csv(args.frontier) or None,
        )
    except (ValueError, OSError) as e:  # bad input: one readable line, not a traceback
        print(f"ldm-report: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, even for YAML's
        return 2
    print(result["table"])
    print(f"wrote {result['markdown']}" + (f" and {result['plot']}" if result["plot"] else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
