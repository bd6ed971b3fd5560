"""Start-up guards and settings for runs at cluster scale (issue 23): bf16-true keeps the EMA in fp32, FSDP's
precisions, multi-node run names, the requeue flag's period, the node-local chunk cache, persistent validation
workers."""

from __future__ import annotations

import pytest
import torch

import ldm.train as train_cli
from ldm.config import ConfigError
from ldm.lit.reliability import ResumeCheckpoint
from ldm.train import train

FAST = ["debug=fast", "logger=csv", "data.batch_size=8"]


class EMAWatch:
    """The EMA copy's dtypes and one averaged tensor at the start and the end of training."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[set, torch.Tensor]] = {}

    def _record(self, when: str, pl_module) -> None:
        params = dict(pl_module.ema.model.named_parameters())
        name = pl_module.ema.averaged[-1]
        self.seen[when] = ({p.dtype for p in params.values()}, params[name].detach().clone(),
                           next(pl_module.model.backbone.parameters()).dtype)

    def on_train_start(self, trainer, pl_module) -> None:
        self._record("start", pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record("end", pl_module)


@pytest.mark.slow
def test_bf16_true_keeps_the_ema_in_fp32_and_it_moves(tiny_vae_export, compose_cfg, tmp_path, monkeypatch):
    import lightning.pytorch as pl

    watch = type("Watch", (EMAWatch, pl.Callback), {})()
    build = train_cli.build_callbacks
    monkeypatch.setattr(train_cli, "build_callbacks", lambda cfg, out: [*build(cfg, out), watch])
    # decay 0.9999 from the first step (warmup_steps=1): a bf16 average would not move at all; validation at step 2
    # evaluates the fp32 EMA on bf16 inputs
    results = train(compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={tiny_vae_export}", *FAST,
                                 "trainer.precision=bf16-true", "stage.module.ema.decay=0.9999",
                                 "stage.module.ema.warmup_steps=1", "stage.final_samples.enabled=false"], tmp_path))
    (start_dtypes, start, live_dtype), (end_dtypes, end, _) = watch.seen["start"], watch.seen["end"]
    assert live_dtype == torch.bfloat16
    assert start_dtypes == end_dtypes == {torch.float32}
    assert not torch.equal(start, end)
    assert torch.isfinite(torch.tensor(results["val/loss"]))


def test_fsdp_with_16_mixed_is_refused_at_start_up(compose_cfg, tmp_path):
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed does not run under FSDP .*use bf16-mixed"):
        train(compose_cfg(["stage=ldm", "trainer=fsdp_sim", "trainer.precision=16-mixed", *FAST], tmp_path))


@pytest.mark.parametrize("launch", [
    {"overrides": ["trainer=ddp_sim", "trainer.num_nodes=2"], "env": {}},
    {"overrides": [], "env": {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none"}},
])
def test_a_multi_node_run_without_a_stable_name_is_refused(compose_cfg, tmp_path, monkeypatch, launch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in launch["env"].items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match="a multi-node run needs a run folder name every node agrees on: set run_name"):
        train(compose_cfg(["stage=vae", *launch["overrides"], *FAST], tmp_path))
    # a name (or a launcher's id) is enough: the same start-up check passes
    train_cli.check_config(compose_cfg(["stage=vae", *launch["overrides"], "run_name=big", *FAST], tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    train_cli.check_config(compose_cfg(["stage=vae", *launch["overrides"], *FAST], tmp_path))


class FakeStrategy:
    def __init__(self) -> None:
        self.calls = 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.calls += 1
        return decision


class FakeTrainer:
    def __init__(self) -> None:
        self.strategy, self.global_step, self.world_size = FakeStrategy(), 0, 2


def test_ranks_compare_requeue_flags_every_n_steps_only(tmp_path):
    callback, trainer = ResumeCheckpoint(str(tmp_path), every_n_steps=10), FakeTrainer()
    for step in range(1, 31):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert trainer.strategy.calls == 3  # steps 10, 20, 30
    trainer.world_size, trainer.strategy.calls = 1, 0  # one process agrees with nobody: every step boundary
    for step in range(31, 34):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, None, None, None, step)
    assert trainer.strategy.calls == 3
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        ResumeCheckpoint(str(tmp_path), every_n_steps=0)


@pytest.mark.parametrize(("env", "expected"), [
    ({"SLURM_TMPDIR": "/scratch/job", "TMPDIR": "/tmp/x"}, "/scratch/job/ldm-stream"),
    ({"TMPDIR": "/local/tmp"}, "/local/tmp/ldm-stream"),
    ({}, "SHARED/ldm-stream"),
])
def test_stream_chunks_are_cached_on_node_local_scratch(compose_cfg, tmp_path, monkeypatch, env, expected):
    for name in ("SLURM_TMPDIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    shared = tmp_path / "shared"
    cfg = compose_cfg(["data=stream", "data.path=s3://bucket/shards", f"paths.cache_dir={shared}"], tmp_path)
    assert cfg.data.cache_dir == expected.replace("SHARED", str(shared))


def test_validation_stream_workers_persist_and_training_ones_do_not(monkeypatch):
    import ldm.data.stream as stream

    monkeypatch.setattr(stream, "_loader_class", lambda: lambda dataset, **kwargs: kwargs)  # the loader's settings
    dm = stream.StreamDataModule("unused", num_workers=2)
    dm.train_dataset = dm.val_dataset = object()
    assert dm.val_dataloader()["persistent_workers"] and not dm.train_dataloader()["persistent_workers"]
    dm.num_workers = 0  # no workers to keep
    assert not dm.val_dataloader()["persistent_workers"]
