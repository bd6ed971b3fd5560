"""Data-parallel scaling of a stage-2 training step: 1, 2, 4, ... processes, one thread each.

Each process trains the embedded default's UNet (``conf/model/ldm/unet_small`` with cond=class: 3x8x8
latents, one class token) under ``DistributedDataParallel`` on a fixed per-process batch (weak scaling),
with the project's own pieces: ``DiffusionObjective`` (eps, linear schedule) with a per-(rank, step)
noise generator, fused AdamW and the EMA update, as ``LatentDiffusionModule`` does. The first stage is
left out: it is frozen, the same per process and orthogonal to scaling. Printed per world size: step time,
img/s per process, total img/s, and scaling efficiency = total img/s / (world x img/s of one process).

    python benchmarks/scaling.py                        # CPU, gloo, 1 2 4 processes
    python benchmarks/scaling.py --worlds 1 2 4 8 --backend nccl --device cuda   # one GPU per process

On a CPU the processes share the machine's cores: efficiency there measures the cores as much as the
communication (two 1-thread processes on 2 cores should scale; four cannot).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm.diffusion.objective import DiffusionObjective
from ldm.diffusion.schedules import NoiseSchedule
from ldm.lit.ema import EMA, EMAConfig
from ldm.nets.unet import TransformerSpec, UNetModel


def build_unet() -> UNetModel:
    # conf/model/ldm/unet_small.yaml with cond=class (10 classes + the null class, one 256-d token).
    spec = TransformerSpec(attention_resolutions=(2, 4), num_heads=4, context_dim=256)
    return UNetModel(in_channels=3, out_channels=3, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                     transformer=spec)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    unet = build_unet().to(device)
    ema = EMA(unet, EMAConfig(decay=0.995))
    model = torch.nn.parallel.DistributedDataParallel(unet, device_ids=[rank] if args.device == "cuda" else None,
                                                      gradient_as_bucket_view=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, fused=True)
    objective = DiffusionObjective(NoiseSchedule("linear"))
    batch = args.batch
    x0 = torch.randn(batch, 3, 8, 8, device=device)
    context = torch.randn(batch, 1, 256, device=device)

    def step(i: int) -> None:
        generator = torch.Generator(device=device).manual_seed(1000 * rank + i)
        per_sample, _ = objective.loss(lambda x, t, c: model(x, t, context=c), x0, context, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()
        ema.update(unet)

    for i in range(args.warmup):
        step(i)
    times = []
    for i in range(args.steps):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step(args.warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    # The slowest rank sets the pace of a synchronous step.
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        results[world] = slowest.tolist()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=64, help="per process (weak scaling)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    manager = mp.Manager()
    results = manager.dict()
    for world in args.worlds:
        mp.spawn(worker, args=(world, free_port(), args, results), nprocs=world, join=True)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"backend {args.backend}, {args.threads} thread(s)/process, batch {args.batch}/process, "
          f"median of {args.steps} steps after {args.warmup} warm-up; load {os.getloadavg()[0]:.2f}")
    print("| processes | step ms (median) | img/s per process | img/s total | scaling efficiency |")
    print("| --- | --- | --- | --- | --- |")
    base = args.batch / statistics.median(results[args.worlds[0]])
    for world in args.worlds:
        step_s = statistics.median(results[world])
        per_process = args.batch / step_s
        # Relative to the first world size's per-process rate (1 process by default).
        efficiency = per_process / base
        print(f"| {world} | {1000 * step_s:.1f} | {per_process:.1f} | {per_process * world:.1f} | {100 * efficiency:.0f} % |")


if __name__ == "__main__":
    main()
