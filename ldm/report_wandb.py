"""``ldm-report wandb:[entity/]project/group``: a sweep's jobs read from the W&B API instead of its folder."""

from __future__ import annotations

from typing import Any

from ldm.report import Job, _numeric_metrics, parse_override


def collect_wandb(path: str, api: Any = None) -> list[Job]:
    """Runs of a W&B group ``[entity/]project/group``; params come from the "key=value" tags of each run."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) not in (2, 3):
        raise ValueError(f"W&B source must be entity/project/group or project/group, got {path!r}")
    if api is None:
        import wandb

        api = wandb.Api()
    entity = parts[0] if len(parts) == 3 else getattr(api, "default_entity", None)
    project, group = parts[-2], parts[-1]
    jobs = []
    for run in api.runs(f"{entity}/{project}" if entity else project, filters={"group": group}):
        params = dict(parse_override(t) for t in (getattr(run, "tags", None) or []) if "=" in t)
        summary = getattr(run, "summary", None) or {}
        # "_step", "_runtime", "_timestamp": W&B bookkeeping, not results.
        metrics = {k: v for k, v in _numeric_metrics(dict(summary.items())).items() if not k.startswith("_")}
        run_path = getattr(run, "path", None)
        job = Job("/".join(run_path) if isinstance(run_path, list | tuple) else str(run.id), params, metrics)
        # A running or crashed run's summary holds whatever it logged last, not a final result.
        if (state := getattr(run, "state", "finished")) != "finished" or not metrics:
            job.missing, job.metrics = True, {}
            job.note = f"state={state}" if state != "finished" else "no numeric summary"
        jobs.append(job)
    return jobs
