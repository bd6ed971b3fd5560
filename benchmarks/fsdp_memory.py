"""Bytes each rank allocates to set up an FSDP backbone and its EMA copy (``ldm.lit.traced_memory``, counted from
the dispatcher, so it runs on the CPU): every rank building the full model and its EMA before sharding
(``--full``, the path before issue 23's meta-device build) vs ranks other than 0 building on the meta device and
receiving their shards from rank 0 (``ldm.lit.meta_init.shard_from_rank0``, what ``configure_model`` does).
No training: the backbone is built, sharded and filled, on ``--world`` gloo processes of one thread each.

    python benchmarks/fsdp_memory.py --model dit_b2 --world 2
    python benchmarks/fsdp_memory.py --model dit_b2 --world 2 --full
    python benchmarks/fsdp_memory.py --model dit_b2 --world 2 --resume

``--resume``: the sharded state is saved as a distributed (DCP) checkpoint, then resumed as ldm-train resumes
one: every rank, 0 included, builds empty and the checkpoint fills its shards (the figures are the resume's).
``--check``: rank 0 also keeps a copy of the initial (or saved) weights, outside the count, and every rank
checks that the gathered backbone and EMA equal it. Each rank prints its figures and writes them to
``<--out>/<full|sharded|resume>_rank<r>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra.utils import instantiate
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
# What the model wires into a backbone from its conditioning (cond=class on 4-channel latents, 1,000 classes).
WIRED = {"in_channels": 4, "out_channels": 4, "num_classes": 1001}


def worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from ldm.lit import meta_init, sharding
    from ldm.lit.ema import EMA, EMAConfig
    from ldm.lit.traced_memory import TracedMemory

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))
    node = OmegaConf.load(REPO / "conf" / "model" / "ldm" / f"{args.model}.yaml").backbone
    factory = instantiate(node)
    policy = sharding.mixed_precision_policy("32-true")
    units = factory.func.fsdp_units
    cpu = torch.device("cpu")
    reference = None
    with TracedMemory() as memory:
        torch.manual_seed(0)
        empty = not args.full and rank != 0
        backbone = meta_init.build_empty(node, **WIRED) if empty else factory(**WIRED)
        if args.check and rank == 0:
            with memory.paused():
                reference = {k: v.clone() for k, v in backbone.state_dict().items()}
        ema = EMA(backbone, EMAConfig(copy_on_meta=not args.full)).model
        if args.full:
            sharding.shard_module(backbone, mesh, units, policy)
            sharding.shard_module(ema, mesh, units, policy)
        else:
            meta_init.shard_from_rank0(backbone, ema, mesh, units, policy, None, cpu)
    if args.resume:
        # The state above, saved as a distributed checkpoint, then resumed the way ldm-train resumes it: every
        # rank (0 included) builds empty, allocates its shards and lets the checkpoint fill them.
        import torch.distributed.checkpoint as dcp

        folder = str(Path(args.out) / "dcp")
        dcp.save({"model": backbone.state_dict(), "ema": ema.state_dict()}, checkpoint_id=folder)
        if args.check:
            with memory.paused():
                reference = sharding.full_state_dict(backbone, only_rank0=True)
        with TracedMemory() as memory:
            backbone = meta_init.build_empty(node, **WIRED)
            ema = EMA(backbone, EMAConfig(copy_on_meta=True)).model
            meta_init.shard_from_rank0(backbone, ema, mesh, units, policy, None, cpu)
            dcp.load({"model": backbone.state_dict(), "ema": ema.state_dict()}, checkpoint_id=folder)
            meta_init.check_filled({"model": backbone, "ema": ema}, cpu, folder)
    weights = sum(sharding.local(t).nbytes for m in (backbone, ema) for t in m.state_dict().values())
    full_bytes = sum(t.numel() * t.element_size() for t in backbone.state_dict().values()) * 2
    record = {"rank": rank, "world": world, "model": args.model, "full": args.full, "resume": args.resume,
              "setup_allocated": memory.allocated, "setup_peak": memory.peak, "held_after": memory.held,
              "local_weights": weights, "model_and_ema": full_bytes}
    record.update(export_bytes(rank, {"model": backbone, "ema": ema}, args))
    if args.check:
        for module in (backbone, ema):
            gathered = sharding.full_state_dict(module, only_rank0=True)
            record.setdefault("equal", []).append(rank != 0 or all(torch.equal(gathered[k], reference[k]) for k in reference))
    mode = "full" if args.full else "resume" if args.resume else "sharded"
    (Path(args.out) / f"{mode}_rank{rank}.json").write_text(json.dumps(record))
    print(json.dumps(record), flush=True)
    dist.destroy_process_group()


def export_bytes(rank: int, modules: dict[str, torch.nn.Module], args: argparse.Namespace) -> dict:
    """Rank 0's traced peak while the sharded ``modules`` are written to one safetensors file: streamed (each
    tensor gathered as it is written, ``save_export``'s way) or, with ``--full``, gathered whole on rank 0 first
    (``sharding.full_state_dict``, the way before)."""
    from ldm.io.export import save_tensors_atomic, save_tensors_streamed
    from ldm.lit import sharding
    from ldm.lit.traced_memory import TracedMemory

    path = Path(args.out) / ("full.safetensors" if args.full else "streamed.safetensors")
    with TracedMemory() as memory:
        if args.full:
            gathered = {f"{prefix}.{k}": v for prefix, module in modules.items()
                        for k, v in sharding.full_state_dict(module, only_rank0=True).items()}
            if rank == 0:
                save_tensors_atomic(path, gathered)
            del gathered
        else:
            tensors = {f"{prefix}.{k}": v for prefix, module in modules.items() for k, v in module.state_dict().items()}
            save_tensors_streamed(path, tensors, write=rank == 0)
            del tensors
    largest = max(t.numel() * t.element_size() for module in modules.values() for t in module.state_dict().values())
    return {"export_peak": memory.peak, "largest_tensor": largest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dit_b2", help="a conf/model/ldm preset with a DiT or UNet backbone")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--full", action="store_true", help="every rank builds the full model and EMA (the old path)")
    parser.add_argument("--resume", action="store_true",
                        help="measure a resume instead: every rank builds empty and a DCP checkpoint fills the shards")
    parser.add_argument("--check", action="store_true", help="check the gathered weights against rank 0's build")
    parser.add_argument("--out", default=".", help="the folder the export file is written to")
    args = parser.parse_args(argv)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(worker, args=(args.world, port, args), nprocs=args.world)


if __name__ == "__main__":
    sys.exit(main())
