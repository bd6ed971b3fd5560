"""FSDP at size, simulated on the CPU (trainer=fsdp_sim: FSDP2 through ModelParallelStrategy, gloo): the
mixed-precision policy on every unit, distributed (DCP) checkpoints written by 2 processes resumed by 3
and by 1 with exactly the state they hold, and init= loaded through rank 0 into meta-built shards. Real
processes through ``python -m ldm.train``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_distributed  # noqa: E402
from test_distributed import export_tensors, ldm_overrides, run_train  # noqa: E402

stage1_export = test_distributed.stage1_export  # the stage-1 export fixture, shared

# Two optimizer steps (a validation and a checkpoint at the second), no sampling: only the state matters here.
SHORT = ["stage.max_steps=2", "stage.val_check_interval=2", "stage.final_samples.enabled=false",
         "stage.module.preview.every_n_steps=0", "trainer.precision=bf16-mixed"]


class ShardedStateRecorder(pl.Callback):
    """Test-only: at train start (after any resume) every rank gathers the full weights, EMA and optimizer
    state (collective) and rank 0 saves them in ``start.pt``; each rank records its units' policies."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        from ldm.lit.sharding import full_state_dict, unit_policies

        weights = full_state_dict(pl_module, only_rank0=True)
        optimizer = trainer.optimizers[0]
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer_state = get_optimizer_state_dict(pl_module, optimizer, options=options)
        policies = {f"{part}.{name}": [str(p.param_dtype), str(p.reduce_dtype)]
                    for part, module in (("backbone", pl_module.model.backbone), ("ema", pl_module.ema.model))
                    for name, p in unit_policies(module).items()}
        backbone = pl_module.model.backbone
        units = {type(backbone.get_submodule(name)).__name__ for name in unit_policies(backbone) if name}
        record = {"world_size": trainer.world_size, "global_step": trainer.global_step, "policies": policies,
                  "units": sorted(units), "initial_weights_from": pl_module.initial_weights_from}
        (self.folder / f"policies{trainer.global_rank}.json").write_text(json.dumps(record))
        if trainer.is_global_zero:
            trained = {k: v for k, v in weights.items()
                       if k.startswith(("model.backbone.", "ema.")) and isinstance(v, torch.Tensor)}
            torch.save({"state_dict": trained, "optimizer": optimizer_state}, self.folder / "start.pt")


def train(export: Path, out: Path, devices: int, *extra: str) -> None:
    run_train(ldm_overrides(export, out, "trainer=fsdp_sim", f"trainer.devices={devices}", *SHORT,
                            "+callbacks.sharded._target_=test_fsdp_sim.ShardedStateRecorder",
                            f"+callbacks.sharded.folder={out}", *extra), timeout=400)


def assert_same_state(resumed: dict, stored: dict) -> None:
    """Bit for bit: nothing was computed, only re-sliced."""
    weights = {k: v for k, v in stored["state_dict"].items()
               if k.startswith(("model.backbone.", "ema.")) and isinstance(v, torch.Tensor)}
    assert resumed["state_dict"].keys() == weights.keys() and any(k.startswith("ema.model.") for k in weights)
    for key, value in weights.items():
        assert torch.equal(resumed["state_dict"][key], value), key
    stored_opt, resumed_opt = stored["optimizer_0"]["state"], resumed["optimizer"]["state"]
    assert resumed_opt.keys() == stored_opt.keys() and len(stored_opt) > 0
    for name, moments in stored_opt.items():
        assert moments.keys() == resumed_opt[name].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(resumed_opt[name][key]), torch.as_tensor(value)), (name, key)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_sharded_checkpoint_of_2_processes_resumes_on_3_and_on_1_with_the_state_it_holds(stage1_export, tmp_path):
    from ldm.io.sharded_checkpoint import consolidate, is_sharded_checkpoint

    first = tmp_path / "two"
    train(stage1_export, first, 2)
    # bf16 compute, fp32 gradient reduction, on every unit of the backbone and of its EMA copy, on every rank.
    for rank in (0, 1):
        record = json.loads((first / f"policies{rank}.json").read_text())
        assert record["units"] == ["FSDPResBlock", "FSDPSpatialTransformer"]  # fully_shard's subclasses
        assert len(record["policies"]) > 4 and "backbone." in record["policies"] and "ema." in record["policies"]
        assert set(map(tuple, record["policies"].values())) == {("torch.bfloat16", "torch.float32")}
        assert record["initial_weights_from"] == "rank 0"  # a fresh run: rank 0's seeded build
    checkpoint = first / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(checkpoint)
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Frozen parts are not stored (they come from first_stage.path), the EMA and its counter are.
    stored = consolidate(checkpoint)
    assert not any(k.startswith("model.first_stage.") for k in stored["state_dict"])
    assert any(k.startswith("ema.model.") for k in stored["state_dict"])
    # ldm-sample reads the folder too: the EMA weights become the backbone.
    from ldm.io.load import load_ldm

    model, _ = load_ldm(checkpoint)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, stored["state_dict"][f"ema.model.{key}"]), key

    # init= under FSDP: rank 0 alone reads the weights (the other ranks build the backbone on the meta device) and
    # sends each rank its shards; the run starts from exactly the export's backbone, EMA included.
    initialised = tmp_path / "init"
    train(stage1_export, initialised, 2, "init=export", f"init.path={first / 'export'}", "stage.max_steps=1")
    source = {k.removeprefix("model.diffusion_model."): v for k, v in export_tensors(first).items()
              if k.startswith("model.diffusion_model.")}
    start = torch.load(initialised / "start.pt", weights_only=True)["state_dict"]
    for prefix in ("model.backbone.", "ema.model."):
        assert {k.removeprefix(prefix) for k in start if k.startswith(prefix)} == source.keys()
        for key, value in source.items():
            assert torch.equal(start[prefix + key], value), prefix + key

    for devices in (3, 1):
        resumed = tmp_path / f"on{devices}"
        train(stage1_export, resumed, devices, f"ckpt_path={checkpoint}", "stage.max_steps=3")
        record = json.loads((resumed / "policies0.json").read_text())
        assert record["world_size"] == devices and record["global_step"] == 2
        # Every rank, 0 included, built the backbone empty and took every tensor from the checkpoint
        # (ldm.lit.meta_init): no rank held a full copy; the state below is the checkpoint's exactly.
        for rank in range(devices):
            assert json.loads((resumed / f"policies{rank}.json").read_text())["initial_weights_from"] == "checkpoint"
        assert_same_state(torch.load(resumed / "start.pt", weights_only=True), stored)
        assert json.loads((resumed / "results.json").read_text())["train/steps"] == 3
