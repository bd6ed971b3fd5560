"""``ldm-report`` on fake sweep trees: seed averaging with exact numbers, row order, bolding, fixed params,
missing jobs, the plot file, the W&B source, and the errors a wrong source gets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from ldm.report import Job, collect, fmt, main, markdown_table, summarize, write_report
from ldm.report_wandb import collect_wandb


def make_job(root: Path, name: str, overrides: list[str], results: dict | None) -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if results is not None:
        (job / "results.json").write_text(json.dumps(results))
    return job


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """sampler x steps x 2 seeds, objective fixed, one job without results; folders in Hydra's 0..N style."""
    root = tmp_path / "multirun"
    fid = {("ddim", "10", "1"): 30.0, ("ddim", "10", "2"): 32.0, ("ddim", "100", "1"): 10.0,
           ("ddim", "100", "2"): 14.0, ("ddim", "20", "1"): 20.0, ("ddim", "20", "2"): 21.0,
           ("dpm", "10", "1"): 25.0, ("dpm", "20", "1"): 12.0, ("dpm", "20", "2"): 13.0,
           ("dpm", "100", "1"): 9.0, ("dpm", "100", "2"): 9.0}
    i = 0
    for sampler in ("ddim", "dpm"):
        for steps in ("10", "20", "100"):
            for seed in ("1", "2"):
                key = (sampler, steps, seed)
                results = None if key not in fid else {
                    "fid": fid[key], "accuracy": 0.9 + fid[key] / 1000, "note": "text is ignored", "ok": True}
                overrides = ["objective=v", f"sampler={sampler}", f"sampler.steps={steps}", f"+seed={seed}"]
                make_job(root, str(i), overrides, results)
                i += 1
    return root


def test_collect_reads_params_metrics_and_missing(sweep: Path) -> None:
    jobs = collect(sweep)
    assert [Path(j.dir).name for j in jobs] == [str(i) for i in range(12)]  # 10 after 9, not after 1
    assert jobs[0].params == {"objective": "v", "sampler": "ddim", "sampler.steps": "10", "seed": "1"}
    assert jobs[0].metrics == {"fid": 30.0, "accuracy": pytest.approx(0.93)}  # strings and bools dropped
    assert [Path(j.dir).name for j in jobs if j.missing] == ["7"]  # dpm, 10 steps, seed 2


def test_summarize_mean_std_over_seeds_and_numeric_sort(sweep: Path) -> None:
    rows = summarize(collect(sweep))
    assert [(r.params["sampler"], r.params["sampler.steps"]) for r in rows] == [
        ("ddim", "10"), ("ddim", "20"), ("ddim", "100"), ("dpm", "10"), ("dpm", "20"), ("dpm", "100")]
    assert all("seed" not in r.params for r in rows)
    ddim100 = rows[2].metrics["fid"]
    assert (ddim100.mean, ddim100.n) == (12.0, 2)
    assert ddim100.std == pytest.approx(2.8284271247)  # sample std (ddof=1) of 10, 14
    lone = rows[3]  # dpm/10 lost its second seed
    assert (lone.n, lone.metrics["fid"].mean, lone.metrics["fid"].std) == (1, 25.0, None)
    assert rows[5].metrics["fid"].std == 0.0


def test_explicit_order_wins_over_sorting(sweep: Path) -> None:
    rows = summarize(collect(sweep), order={"sampler": ["dpm", "ddim"], "sampler.steps": [100, 10]})
    assert [(r.params["sampler"], r.params["sampler.steps"]) for r in rows] == [
        ("dpm", "100"), ("dpm", "10"), ("dpm", "20"), ("ddim", "100"), ("ddim", "10"), ("ddim", "20")]


def test_fmt_significant_digits() -> None:
    assert [fmt(12.3), fmt(12.3456), fmt(0.97), fmt(1234.56), fmt(0.0), fmt(2.8284, 2)] == [
        "12.3", "12.35", "0.97", "1235", "0", "2.8"]
    assert fmt(1.23456e-6) == "1.235e-06"
    assert fmt(float("nan")) == "nan"


def test_markdown_table_cells_seeds_and_bold() -> None:
    jobs = [Job("a", {"s": "x", "seed": "1"}, {"fid": 10.0, "acc": 0.5}),
            Job("b", {"s": "x", "seed": "2"}, {"fid": 12.0, "acc": 0.7}),
            Job("c", {"s": "y", "seed": "1"}, {"fid": 8.0, "acc": 0.4})]
    table = markdown_table(summarize(jobs), ["fid", "acc"], lower_is_better={"fid"})
    assert table.splitlines() == [
        "| s | seeds | fid | acc |",
        "|---|---:|---:|---:|",
        "| x | 2 | 11 ± 1.4 | **0.6 ± 0.14** |",
        "| y | 1 | **8** | 0.4 |",
    ]
    # Without the hint fid counts as higher-is-better: the bold moves, so the hint is what decides.
    assert "**11 ± 1.4**" in markdown_table(summarize(jobs), ["fid"])


def test_write_report_files(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = write_report(sweep, out, title="Steps sweep", x="sampler.steps", series="sampler",
                          metrics=["fid", "accuracy"], lower_is_better={"fid"}, logx=True, notes="Run on CPU.")
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "# Steps sweep"
    assert "12 jobs" in md and "11 finished, 1 missing" in md and "6 configurations" in md
    assert "| sampler | sampler.steps | seeds | fid | accuracy |" in md  # objective is fixed: no column
    assert "| dpm | 100 | 2 | **9 ± 0** | 0.909 ± 0 |" in md
    assert "| ddim | 10 | 2 | 31 ± 1.4 | **0.931 ± 0.0014** |" in md
    assert "Fixed: objective=v" in lines
    assert "## Missing results (1 of 12 jobs)" in md
    assert "- `7` (objective=v, sampler=dpm, sampler.steps=10, seed=2)" in lines
    assert md.index("Fixed:") < md.index("## Missing") < md.index("![](results.png)") < md.index("Run on CPU.")

    png = out / "results.png"
    assert result["plot"] == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # temp files renamed away

    data = json.loads((out / "results.json").read_text())
    assert (data["finished"], data["fixed"], len(data["rows"])) == (11, {"objective": "v"}, 6)
    assert data["rows"][0]["metrics"]["fid"] == {"mean": 31.0, "std": pytest.approx(1.41421356), "n": 2}
    assert [Path(d).name for d in data["missing"]] == ["7"]
    assert result["rows"][0].params["sampler"] == "ddim"


def test_no_plot_without_x_and_lone_seed_is_fixed(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["lr=0.1", "seed=3"], {"loss": 1.0})
    make_job(tmp_path, "1", ["lr=0.01", "seed=3"], {"loss": 0.5})
    result = write_report(tmp_path, tmp_path / "out", title="lr")
    md = result["markdown"].read_text()
    assert result["plot"] is None and not (tmp_path / "out" / "results.png").exists()
    assert "![](results.png)" not in md and "seeds" not in md
    assert "Fixed: seed=3" in md
    # numeric order; loss is not in lower_is_better, so the higher one is bolded as best
    assert md.index("| 0.01 | 0.5 |") < md.index("| 0.1 | **1** |")


def test_columns_follow_the_command_line_and_partial_results(tmp_path: Path) -> None:
    """Columns in sweep order (not alphabetical), a metric only one seed logged says n=1, a torn results.json
    is a missing job with its reason, and a categorical x with an extra varying param still plots."""
    make_job(tmp_path, "0", ["steps=10", "sampler=ddim", "seed=1"], {"fid": 3.0, "kid": 0.5})
    make_job(tmp_path, "1", ["steps=10", "sampler=ddim", "seed=2"], {"fid": 5.0})
    make_job(tmp_path, "2", ["steps=10", "sampler=euler", "seed=1"], {"fid": 2.0, "kid": 0.25})
    make_job(tmp_path, "3", ["steps=20", "sampler=euler", "seed=1"], {"fid": 1.0, "kid": 0.125})
    (make_job(tmp_path, "4", ["steps=20", "sampler=ddim", "seed=1"], None) / "results.json").write_text('{"fid": 1')
    result = write_report(tmp_path, tmp_path / "out", title="t", x="sampler", lower_is_better={"fid", "kid"})
    lines = result["markdown"].read_text().splitlines()
    assert "| steps | sampler | seeds | fid | kid |" in lines
    assert "| 10 | ddim | 2 | 4 ± 1.4 | 0.5 (n=1) |" in lines
    assert "| 20 | euler | 1 | **1** | **0.125** |" in lines
    assert any(ln.startswith("- `4` (steps=20, sampler=ddim, seed=1): unreadable results.json") for ln in lines)
    with Image.open(result["plot"]) as im:
        assert im.size[0] > 100


def test_zero_finished_jobs_is_a_clear_error(tmp_path: Path) -> None:
    make_job(tmp_path, "0", ["seed=1"], None)
    with pytest.raises(ValueError, match=r"no finished jobs under .*overrides\.yaml and results\.json"):
        write_report(tmp_path, tmp_path, title="t")
    with pytest.raises(ValueError, match="no finished jobs"):
        write_report(tmp_path / "empty", tmp_path / "o", title="t")


def test_report_refuses_to_overwrite_a_jobs_results(tmp_path: Path) -> None:
    job = make_job(tmp_path, "run", ["seed=1"], {"fid": 1.0})
    with pytest.raises(ValueError, match="job folder"):
        write_report(job, job, title="t")
    assert json.loads((job / "results.json").read_text()) == {"fid": 1.0}


def test_cli_writes_report_and_prints_table(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([str(sweep), "--metrics", "fid", "--lower-is-better", "fid", "--order", "sampler=dpm,ddim"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "| sampler | sampler.steps | seeds | fid |"
    assert out.splitlines()[2].startswith("| dpm | 10 | 1 | 25 |")
    md = (sweep / "results.md").read_text()
    assert md.startswith("# multirun\n") and "accuracy" not in md
    # no --x: plotted against the swept key with the most (numeric) values, the other one as lines
    assert (sweep / "results.png").is_file() and "![](results.png)" in md


def test_cli_drops_constant_columns_and_plots_by_the_swept_key(tmp_path: Path, capsys) -> None:
    """A plain 2-job sweep: batch/world_size is 1 in every job, so it is one line under the table, not a
    column; the plot is drawn against the one swept key without --x; a FAILED job's note says why."""
    for i, scale in enumerate(("1.5", "3")):
        make_job(tmp_path, str(i), [f"guidance_scale={scale}"], {"fid": 10.0 + i, "batch/world_size": 1})
    (make_job(tmp_path, "2", ["guidance_scale=6"], None) / "FAILED").write_text("ConfigError: bad thing\n")
    assert main([str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| guidance_scale | fid |"
    md = (tmp_path / "results.md").read_text()
    assert "Same in every row: batch/world_size 1" in md and "![](results.png)" in md
    assert "- `2` (guidance_scale=6): failed: ConfigError: bad thing" in md
    assert main([str(tmp_path), "--no-plot", "--out", str(tmp_path / "t")]) == 0
    assert not (tmp_path / "t" / "results.png").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["{root}/nope"], "is not a folder"), (["wandb:p/g"], "--out is required"),
     (["{root}", "--metrics", "bogus"], "unknown metrics"), (["{root}", "--x", "lr"], "x='lr' is not a param")],
)
def test_cli_errors_are_one_line_exit_2(sweep, capsys, argv: list[str], message: str) -> None:
    assert main([a.format(root=sweep) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ldm-report: error: ") and message in err and err.count("\n") == 1


def test_collect_wandb_with_fake_api() -> None:
    def run(rid: str, tags: list[str], summary: dict, state: str = "finished") -> SimpleNamespace:
        return SimpleNamespace(id=rid, path=["me", "proj", rid], tags=tags, summary=summary, state=state)

    calls = []

    class FakeApi:
        default_entity = "me"

        def runs(self, path: str, filters: dict) -> list[SimpleNamespace]:
            calls.append((path, filters))
            return [run("a", ["sampler=ddim", "+seed=1", "baseline"], {"fid": 10.0, "_step": 5, "img": {"x": 1}}),
                    run("b", ["sampler=ddim", "seed=2"], {"fid": 14.0}),
                    run("c", ["sampler=ddim", "seed=3"], {"fid": 99.0}, state="crashed")]

    jobs = collect_wandb("proj/sweep-1", api=FakeApi())
    assert calls == [("me/proj", {"group": "sweep-1"})]
    assert jobs[0] == Job("me/proj/a", {"sampler": "ddim", "seed": "1"}, {"fid": 10.0})
    assert [j.missing for j in jobs] == [False, False, True] and jobs[2].note == "state=crashed"
    (row,) = summarize(jobs)
    assert (row.metrics["fid"].mean, row.n) == (12.0, 2)
    collect_wandb("team/proj/g", api=FakeApi())
    assert calls[-1] == ("team/proj", {"group": "g"})
    with pytest.raises(ValueError, match="entity/project/group"):
        collect_wandb("just-one", api=FakeApi())


def test_a_frontier_plot_draws_one_metric_against_another(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "frontier"
    result = write_report(sweep, out, title="t", x="sampler.steps", series="sampler", metrics=["fid", "accuracy"],
                          lower_is_better={"fid"}, frontier=["fid", "accuracy"])
    assert "![](results_frontier.png)" in result["markdown"].read_text()
    assert Image.open(out / "results_frontier.png").size[0] > 300
    with pytest.raises(ValueError, match="no job reports both fid and kid"):
        write_report(sweep, tmp_path / "bad", title="t", x="sampler.steps", metrics=["fid"], frontier=["fid", "kid"])
