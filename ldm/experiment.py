"""``ldm-experiment NAME``: run one study of ``experiments/NAME`` end to end and write its results table.

A study is a short list of phases, each one Hydra multirun (``ldm-train -m`` or ``ldm-evaluate -m``)
whose sweep is a Hydra config in the study's folder (``hydra.sweeper.params``), followed by
``ldm-report`` over the jobs. ``experiments/NAME/study.yaml`` says which phases, which model they build
on and how the table and plot are drawn; ``make experiment NAME=...`` calls this. Phases run as
subprocesses of the same console scripts a user would type, so the study is exactly the sum of the
commands it prints.

    ldm-experiment --list                     # the studies and their questions
    ldm-experiment guidance --dry-run         # the commands it would run, nothing run
    ldm-experiment guidance                   # full study: results into experiments/guidance/
    ldm-experiment guidance --smoke           # a few steps of everything, results under the run folder
    ldm-experiment prediction --launcher joblib --jobs 2    # parallel jobs on one machine
    ldm-experiment f_factor --launcher slurm -- hydra.launcher.partition=gpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
STUDIES_DIR = ROOT / "experiments"
APPS = {"train": "ldm.train", "evaluate": "ldm.evaluate"}
# The base every study builds on: the embedded default's autoencoder and class-conditional LDM, trained
# by exactly the commands of `make train` (smoke: a few steps of each).
BASE_COMMANDS = {
    "vae": ["stage=vae", "group=default"],
    "ldm": ["stage=ldm", "first_stage.path={base}/vae/export", "group=default"],
}
SMOKE_BASE = {
    "vae": ["debug=fast"],
    "ldm": ["debug=fast", "model/ldm=unet_tiny", "stage.final_samples.enabled=false"],
}


class StudyError(ValueError):
    """A study that cannot run: unknown name, malformed study.yaml, a phase that failed."""


def available_studies() -> list[str]:
    return sorted(p.parent.name for p in STUDIES_DIR.glob("*/study.yaml"))


def load_study(name: str) -> dict[str, Any]:
    path = STUDIES_DIR / name / "study.yaml"
    if not path.is_file():
        raise StudyError(f"no study {name!r}: choose one of {available_studies()} (experiments/<name>/study.yaml)")
    study = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for key in ("title", "phases", "report"):
        if key not in study:
            raise StudyError(f"{path} has no `{key}`")
    for phase in study["phases"]:
        if phase.get("app") not in APPS:
            raise StudyError(f"{path}: phase {phase.get('name')!r} has app={phase.get('app')!r}; use one of {list(APPS)}")
        if not (STUDIES_DIR / name / f"{phase['config']}.yaml").is_file():
            raise StudyError(f"{path}: phase {phase['name']!r} names config {phase['config']!r}, which is not in {path.parent}")
    study["name"] = name
    return study


def run_command(cmd: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run one command, its output shown live and kept in ``log_path``; returns its wall time."""
    print("$ " + shlex.join(cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - started
    if code != 0:
        raise StudyError(f"command failed with exit status {code} (log: {log_path}): {shlex.join(cmd)}")
    return seconds


def show_command(cmd: list[str], env: dict[str, str], log_path: Path) -> float:
    """--dry-run: the command as run_command would run it, not run."""
    print("$ " + shlex.join(cmd), flush=True)
    return 0.0


def list_studies() -> str:
    lines = ["studies (experiments/<name>; run one with ldm-experiment NAME, check it with --smoke):"]
    for name in available_studies():
        title = OmegaConf.load(STUDIES_DIR / name / "study.yaml").get("title", "")
        lines.append(f"  {name:<12} {title}")
    return "\n".join(lines)


def ensure_base(base: Path, smoke: bool, env: dict[str, str], log_path: Path,
                stages: Sequence[str] = ("vae", "ldm"), run: Any = run_command) -> dict[str, float]:
    """Train the base models unless ``base`` already holds them (e.g. from ``make train``); ``stages``:
    which of them the study needs (``base: vae`` in study.yaml: only the autoencoder)."""
    seconds = {}
    for stage in stages:
        if (base / stage / "export" / "config.yaml").is_file():
            continue
        args = [a.format(base=base) for a in BASE_COMMANDS[stage] + (SMOKE_BASE[stage] if smoke else [])]
        cmd = [sys.executable, "-m", APPS["train"], *args, f"hydra.run.dir={base / stage}"]
        seconds[f"base {stage}"] = run(cmd, env, log_path)
    return seconds


# Smoke mode keeps this many values of each swept axis: enough to check that the axis changes the job
# and that the report draws a line, without the full grid (the guidance sweep is 7 x 3 = 21 jobs).
SMOKE_VALUES_PER_AXIS = 2


def sweep_axes(study: dict[str, Any], phase: dict[str, Any]) -> dict[str, list[str]]:
    """The phase's swept axes and their values, as its sweep config lists them (plain comma lists only;
    a Hydra sweep function such as ``range(...)`` is kept as one opaque value)."""
    sweep = OmegaConf.load(STUDIES_DIR / study["name"] / f"{phase['config']}.yaml")
    params = OmegaConf.select(sweep, "hydra.sweeper.params") or {}
    axes = {}
    for key, values in params.items():
        text = str(values)
        axes[str(key)] = [text] if any(c in text for c in "([{'\"") else [v.strip() for v in text.split(",")]
    return axes


def smoke_axes(study: dict[str, Any], phase: dict[str, Any], given: list[str]) -> list[str]:
    """Overrides that cut every swept axis that ``given`` leaves alone to its first and last values."""
    set_keys = {a.split("=", 1)[0].lstrip("+~") for a in given if "=" in a}
    cut = []
    for key, values in sweep_axes(study, phase).items():
        if key not in set_keys and len(values) > SMOKE_VALUES_PER_AXIS:
            cut.append(f"{key}={values[0]},{values[-1]}")
    return cut


def phase_command(study: dict[str, Any], phase: dict[str, Any], *, base: Path, out: Path, smoke: bool,
                  launcher: str | None, jobs: int, extra: list[str]) -> list[str]:
    fmt = {"base": base, "out": out}
    args = [str(a).format(**fmt) for a in phase.get("overrides", [])]
    if smoke:
        args += [str(a).format(**fmt) for a in phase.get("smoke", [])]
        args += smoke_axes(study, phase, [*args, *extra])
    if launcher == "joblib":
        args += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"]
    elif launcher == "slurm":
        args += ["hydra/launcher=slurm"]
    return [sys.executable, "-m", APPS[phase["app"]], "-m", "--config-dir", str(STUDIES_DIR / study["name"]),
            "--config-name", str(phase["config"]), *args, f"hydra.sweep.dir={out / phase['name']}", *extra]


def run_study(name: str, *, smoke: bool = False, base: Path | None = None, out: Path | None = None,
              report_dir: Path | None = None, launcher: str | None = None, jobs: int = 2,
              extra: list[str] | None = None, skip: Sequence[str] = (), dry_run: bool = False) -> dict[str, Any]:
    """Run every phase of the study, then write its report; returns the report's paths and timings.

    ``skip``: phases whose jobs already finished under ``out`` (an earlier run of the same study, e.g.
    stopped in a later phase); they are not run again, and their jobs still go into the report.
    """
    from ldm.report import write_report

    study = load_study(name)
    names = [p["name"] for p in study["phases"]]
    unknown = sorted(set(skip) - set(names))
    if unknown:
        raise StudyError(f"cannot skip {unknown}: the phases of {name} are {names}")
    if skip and out is None:
        raise StudyError("skipping phases needs --out: the folder of the earlier run that holds their jobs")
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    # A fresh folder per run: an earlier run's jobs are never overwritten or mixed into this table.
    out = Path(out or ROOT / "outputs" / "experiments" / name / (f"smoke_{stamp}" if smoke else stamp)).resolve()
    base = Path(base or (out / "base" if smoke else ROOT / "outputs" / "default")).resolve()
    report_dir = Path(report_dir or (out / "report" if smoke else STUDIES_DIR / name)).resolve()
    env = dict(os.environ)
    if launcher == "joblib":
        # Parallel jobs share the cores: more threads than cores made one step ~10x slower here.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, jobs))))
    log_path = out / "experiment.log"
    needs = study.get("base", True)
    stages = ("vae",) if needs == "vae" else ("vae", "ldm")
    run = show_command if dry_run else run_command
    timings = ensure_base(base, smoke, env, log_path, stages, run) if needs else {}
    for phase in study["phases"]:
        if phase["name"] in skip:
            if not (out / phase["name"]).is_dir():
                raise StudyError(f"cannot skip phase {phase['name']!r}: {out / phase['name']} does not exist")
            continue
        cmd = phase_command(study, phase, base=base, out=out, smoke=smoke, launcher=launcher, jobs=jobs, extra=extra or [])
        timings[f"phase {phase['name']}"] = run(cmd, env, log_path)
    if dry_run:
        return {"out": str(out), "report_dir": str(report_dir), "timings": {}, "report": {}, "dry_run": True}
    lines = [f"- {what}: {seconds / 60:.1f} min" for what, seconds in timings.items()]
    lines += [f"- phase {p}: run earlier in the same folder (skipped here)" for p in names if p in skip]
    notes = "\n".join([
        "## How this table was made",
        f"`ldm-experiment {name}{' --smoke' if smoke else ''}` on {dt.date.today().isoformat()}; jobs under `{out}`."
        " Wall time on this machine:",
        *lines,
    ])
    written = {}
    specs = study["report"] if isinstance(study["report"], list) else [study["report"]]
    for i, spec in enumerate(specs):
        spec = dict(spec)
        # Each phase's jobs form their own table; a second table of a study goes into a subfolder.
        phase = spec.pop("phase", study["phases"][-1]["name"])
        sub = spec.pop("name", None)
        target = report_dir / sub if i > 0 or sub else report_dir
        title = study["title"] if i == 0 else f"{study['title']}: {sub or phase}"
        try:
            written[sub or phase] = write_report(out / phase, target, title=title, notes=notes, **spec)
        except ValueError as err:  # no finished jobs, a metric no job reported: the report names it
            raise StudyError(f"report of phase {phase!r}: {err}") from err
    return {"out": str(out), "report_dir": str(report_dir), "timings": timings, "report": written}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="ldm-experiment", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("name", nargs="?", help=f"a study folder under experiments/: {', '.join(available_studies())}")
    parser.add_argument("--list", action="store_true", help="list the studies and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the commands the study would run, run nothing")
    parser.add_argument("--smoke", action="store_true", help="a few steps of every job (checks the whole study)")
    parser.add_argument("--base", type=Path, help="folder with the base vae/ and ldm/ runs (default: outputs/default)")
    parser.add_argument("--out", type=Path, help="where the jobs go (default: outputs/experiments/NAME/<time>)")
    parser.add_argument("--report-dir", type=Path, help="where results.md/png go (default: experiments/NAME)")
    parser.add_argument("--launcher", choices=["basic", "joblib", "slurm"], default="basic")
    parser.add_argument("--jobs", type=int, default=2, help="parallel jobs with --launcher joblib")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PHASE",
                        help="phases already run under --out (their jobs are reported, not rerun)")
    parser.add_argument("extra", nargs="*", default=[], help="optional: more Hydra overrides for every phase (after --)")
    args = parser.parse_args(argv)
    if args.list or args.name is None:
        print(list_studies())
        return
    try:
        result = run_study(args.name, smoke=args.smoke, base=args.base, out=args.out, report_dir=args.report_dir,
                           launcher=None if args.launcher == "basic" else args.launcher, jobs=args.jobs,
                           extra=args.extra, skip=args.skip, dry_run=args.dry_run)
    except StudyError as err:
        print(f"ldm-experiment: error: {err}", file=sys.stderr)
        sys.exit(2)
    if not args.dry_run:
        print(f"report: {result['report_dir']}/results.md", flush=True)


if __name__ == "__main__":
    main()
