"""Peak host memory per rank and images per second when N samples are drawn into one samples.npz on 1 and on 2
processes (gloo, one thread each): the path of ldm-sample / final samples / ldm-evaluate model mode.

    OMP_NUM_THREADS=1 python benchmarks/sampling_scale.py --images 4000 --procs 1 2

A small untrained model of the right shapes (weights do not change the cost): the tiny UNet on 3x8x8 latents, a
small KL autoencoder (f = 4) decoding to 32x32 RGB (3 KB per uint8 image, 12 KB in float32), 1,000 classes,
DDIM with 2 steps. Run with PYTHONPATH pointing at another checkout to measure its code: before the streaming
sampler (no ldm.model.sharded.sample_stream) the set is drawn with sample_sharded, gathered on every rank and saved
by rank 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule
from ldm.model import FirstStage, LatentDiffusion, sharded
from ldm.nets.autoencoder import AutoencoderKL
from ldm.nets.conditioners import ClassEmbedder, Conditioner
from ldm.nets.unet import TransformerSpec, UNetModel

SIZE, CLASSES, SAMPLER = 32, 1000, {"name": "ddim", "steps": 2}


def build() -> LatentDiffusion:
    torch.manual_seed(0)
    unet = UNetModel(3, 3, 32, (1, 2), 1, TransformerSpec(attention_resolutions=(2,), num_heads=2, context_dim=16))
    ddconfig = dict(ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=3, attn_resolutions=[], in_channels=3,
                    out_ch=3, resolution=SIZE, dropout=0.0, double_z=True, use_mid_attn=False, norm_num_groups=8)
    first_stage = FirstStage(AutoencoderKL(ddconfig, embed_dim=3), scale_factor=1.0, sample_posterior=False)
    conditioner = Conditioner([ClassEmbedder(CLASSES, embed_dim=16, drop_rate=0.0)])
    return LatentDiffusion(unet, conditioner, first_stage, DiffusionObjective(NoiseSchedule(kind="linear")))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def draw(model: LatentDiffusion, n: int, batch_size: int, out: Path) -> None:
    labels = torch.arange(n) % CLASSES
    if hasattr(sharded, "sample_stream"):  # this checkout streams
        from ldm.io.samples import sample_to_npz

        sample_to_npz(model, {"label": labels}, SIZE, 0, out, batch_size=batch_size, sampler=SAMPLER)
        return
    from ldm.io.samples import save_samples_npz

    images = sharded.sample_sharded(model, {"label": labels}, SIZE, 0, sampler=SAMPLER, batch_size=batch_size)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_samples_npz(out, images, labels=labels)


def worker(rank: int, world: int, port: int, n: int, batch_size: int, folder: str, results: dict) -> None:
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build().eval()
    draw(model, min(n, batch_size), batch_size, Path(folder) / "warmup.npz")  # kernel selection, not timed
    baseline = rss_mb()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    draw(model, n, batch_size, Path(folder) / "samples.npz")
    if world > 1:
        dist.barrier()
    results[rank] = (time.perf_counter() - start, baseline, rss_mb())
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[400, 1200])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=250)
    args = parser.parse_args()
    mode = "streaming (sample_to_npz)" if hasattr(sharded, "sample_stream") else "gathered (sample_sharded)"
    print(f"torch {torch.__version__}, {mode}, {SIZE}x{SIZE} RGB, batch {args.batch_size}, load {os.getloadavg()[0]:.1f}")
    print(f"{'procs':>5} {'images':>7} {'img/s':>7} {'RSS before MB (per rank)':>26} {'peak MB (per rank)':>20}")
    for n in args.images:
        for world in args.procs:
            with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
                results = manager.dict()
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                mp.spawn(worker, args=(world, port, n, args.batch_size, folder, results), nprocs=world)
                seconds = max(r[0] for r in results.values())
                before = " / ".join(f"{results[r][1]:.0f}" for r in range(world))
                peak = " / ".join(f"{results[r][2]:.0f}" for r in range(world))
                print(f"{world:5d} {n:7d} {n / seconds:7.1f} {before:>26} {peak:>20}", flush=True)


if __name__ == "__main__":
    main()
