"""Host-device syncs per training step, and the throughput telemetry's MFU beside this script's own FLOP count.

Real ``ldm-train`` stage-2 runs (MNIST-5k through a small f=4 autoencoder trained first, 3x8x8 latents,
cond=class): the default UNet (``model/ldm=unet_small``) and a DiT (``--dit``, default ``dit_s2``).

* syncs: ``ldm.lit.syncs.StepSyncCounter`` counts, per training batch, every op that makes the host wait for the
  device (value reads, data-dependent shapes, device-to-host copies), callbacks included; printed for the
  steps outside the logging steps and for the logging steps (``trainer.log_every_n_steps``).
* MFU: a second run without the counter (it slows every op), with ``ldm.lit.telemetry.ThroughputTelemetry`` given
  the matmul peak measured here (``train_throughput.matmul_peak``); beside it, this script's own count of the
  backbone's forward + backward FLOPs on the same batch shape (``FlopCounterMode``), and the MFU that count gives
  at the telemetry's samples/s. The telemetry counts the whole step, so the frozen autoencoder's encoding is in
  its figure and not in the backbone's.

    python benchmarks/step_syncs.py --steps 12 --every 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_throughput import matmul_peak  # noqa: E402

import ldm.train as train_cli  # noqa: E402
from ldm.config import register_resolvers  # noqa: E402
from ldm.lit.syncs import StepSyncCounter  # noqa: E402

try:  # absent before issue 23: the "before" column has syncs only
    from ldm.lit.telemetry import ThroughputTelemetry
except ImportError:
    ThroughputTelemetry = None


def compose_run(overrides: list[str], out: Path):
    with initialize_config_dir(config_dir=train_cli.CONF_DIR, version_base="1.3"):  # the conf/ of the ldm imported
        return compose("train", overrides=[*overrides, f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}"])


def run(overrides: list[str], out: Path, extra_callbacks: list) -> dict:
    build = train_cli.build_callbacks

    def with_extra(cfg, folder):
        # The telemetry of the default callbacks (where it exists) is replaced by the one given here.
        kept = [c for c in build(cfg, folder) if ThroughputTelemetry is None or not isinstance(c, ThroughputTelemetry)]
        return [*kept, *extra_callbacks]

    train_cli.build_callbacks = with_extra
    try:
        return train_cli.train(compose_run(overrides, out))
    finally:
        train_cli.build_callbacks = build


class BackboneInputs(pl.Callback):
    """Keeps the module and the backbone's inputs of one training forward (detached copies)."""

    def __init__(self) -> None:
        self.module, self.inputs = None, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = pl_module

        def keep(module, args, kwargs):
            if self.inputs is None and torch.is_grad_enabled():
                detach = lambda v: v.detach().clone() if torch.is_tensor(v) else v  # noqa: E731
                self.inputs = ([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()})

        pl_module.model.backbone.register_forward_pre_hook(keep, with_kwargs=True)


def backbone_flops_per_sample(grab: BackboneInputs) -> float:
    """Forward + backward FLOPs of the backbone alone on one training batch's inputs, per sample."""
    args, kwargs = grab.inputs
    backbone = grab.module.model.backbone
    counter = FlopCounterMode(display=False)
    with counter:
        backbone(*args, **kwargs).float().pow(2).mean().backward()
    backbone.zero_grad(set_to_none=True)
    return counter.get_total_flops() / args[0].shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--every", type=int, default=4, help="trainer.log_every_n_steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dit", default="dit_s2", help="the DiT size (conf/model/ldm)")
    args = parser.parse_args()
    register_resolvers()
    torch.manual_seed(0)
    peak = statistics.median(matmul_peak(torch.device("cpu"), torch.float32) for _ in range(3))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["logger=csv", "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0"]
        train_cli.train(compose_run(["stage=vae", "debug=fast", *common[:1]], tmp / "vae"))
        stage2 = ["stage=ldm", f"first_stage.path={tmp / 'vae' / 'export'}", *common, f"data.batch_size={args.batch}",
                  f"stage.max_steps={args.steps}", f"stage.val_check_interval={args.steps}", "++trainer.limit_val_batches=1",
                  f"trainer.log_every_n_steps={args.every}"]
        header = (f"{'backbone':<12} {'syncs/step':>10} {'at log steps':>12} {'samples/s':>10} {'telemetry GFLOP/sample':>22} "
                  f"{'MFU':>7} {'backbone GFLOP/sample':>21} {'MFU (backbone)':>14}")
        rows = []
        for name in ("unet_small", args.dit):
            overrides = [*stage2, f"model/ldm={name}"]
            counter = StepSyncCounter()
            run(overrides, tmp / f"{name}_syncs", [counter])
            logging = {s for s in counter.counts if s % args.every == 0}
            outside = [n for s, n in counter.counts.items() if s not in logging]
            at_log = [counter.counts[s] for s in sorted(logging)]
            row = f"{name:<12} {statistics.mean(outside):10.2f} {statistics.mean(at_log) if at_log else 0:12.2f}"
            if ThroughputTelemetry is not None:
                telemetry, grab = ThroughputTelemetry(peak_tflops=peak / 1e12), BackboneInputs()
                run(overrides, tmp / f"{name}_perf", [telemetry, grab])
                figures = telemetry.last
                own = backbone_flops_per_sample(grab)
                mfu_own = own * figures["perf/samples_per_s"] / peak
                row += (f" {figures['perf/samples_per_s']:10.1f} {telemetry.flops_per_sample / 1e9:22.4f} "
                        f"{figures.get('perf/mfu', float('nan')):7.1%} {own / 1e9:21.4f} {mfu_own:14.1%}")
            rows.append(row)
            print(f"{name}: ops at the first non-logging step: {dict(counter.ops[min(set(counter.counts) - logging)])}")
        print(header + "\n" + "-" * len(header) + "\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
