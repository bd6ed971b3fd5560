"""Training-step throughput of our UNet vs diffusers' UNet2DConditionModel of the same architecture.

One full step each: forward, MSE loss in fp32, backward, AdamW step, EMA update (ours: ldm.lit.ema.EMA;
diffusers: diffusers.training_utils.EMAModel). The diffusers model is built by diffusers' own CompVis ->
diffusers config conversion from our config and loaded with our converted weights, so both compute the
same function with the same parameter count. Runs alternate between the two models in one process.

    python benchmarks/train_throughput.py --size small
    python benchmarks/train_throughput.py --size ref --rounds 5
    python benchmarks/train_throughput.py --size sd --device cuda --precision bf16

Model FLOP utilisation = FLOPs of one step (torch.utils.flop_counter over forward + backward; the
optimizer and EMA are bandwidth-bound and not counted) / step time / measured peak, where the peak is
the best rate of a large fp32 (or bf16) matmul on the same device with the same threads.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ldm.lit.ema import EMA, EMAConfig
from ldm.nets.unet import TransformerSpec, UNetModel


@dataclass
class Size:
    """A CompVis unet_config, the latent shape and the context tokens of one benchmark point."""

    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    num_heads: int
    context_dim: int
    context_tokens: int
    latent_channels: int
    latent_size: int
    batch: int


SIZES = {
    # conf/model/ldm/unet_small with cond=class (one 256-d token) on kl_f4 MNIST latents (3 x 8 x 8).
    "small": Size(64, (1, 2, 2), 1, (2, 4), 4, 256, 1, 3, 8, 64),
    # The CPU reference point: ~9.3 M parameters, 8x8x4 latents, 8 context tokens, batch 64.
    "ref": Size(64, (1, 2, 2), 2, (4,), 4, 768, 8, 4, 8, 64),
    # Stable Diffusion 1.x UNet on 32x32x4 latents (256 px images), CLIP-L context: for GPUs.
    "sd": Size(320, (1, 2, 4, 4), 2, (4, 2, 1), 8, 768, 77, 4, 32, 32),
}


def build_ours(size: Size) -> UNetModel:
    spec = TransformerSpec(size.attention_resolutions, num_heads=size.num_heads, context_dim=size.context_dim)
    return UNetModel(size.latent_channels, size.latent_channels, size.model_channels, size.channel_mult,
                     size.num_res_blocks, spec)


def build_diffusers(size: Size, ours: UNetModel):
    """diffusers' UNet2DConditionModel from diffusers' own LDM->diffusers conversion of our config/weights."""
    import diffusers
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    params = dict(in_channels=size.latent_channels, out_channels=size.latent_channels,
                  model_channels=size.model_channels, channel_mult=list(size.channel_mult),
                  num_res_blocks=size.num_res_blocks, attention_resolutions=list(size.attention_resolutions),
                  num_heads=size.num_heads, transformer_depth=1, context_dim=size.context_dim)
    original = {"model": {"params": {"unet_config": {"params": params},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, checkpoint)
    config["sample_size"] = size.latent_size
    theirs = diffusers.UNet2DConditionModel(**config)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, config), strict=True)
    return theirs


class Runner:
    """One model with its optimizer, EMA and a fixed batch: ``step()`` is one full training step."""

    def __init__(self, name: str, model, ema_update, args, size: Size, device: torch.device):
        self.name, self.model, self.ema_update = name, model.to(device).train(), ema_update
        gen = torch.Generator().manual_seed(0)
        b, c, s = size.batch, size.latent_channels, size.latent_size
        self.x = torch.randn(b, c, s, s, generator=gen).to(device)  # (B, C, h, w) noisy latents
        self.t = torch.randint(0, 1000, (b,), generator=gen).to(device)
        self.context = torch.randn(b, size.context_tokens, size.context_dim, generator=gen).to(device)
        self.target = torch.randn(b, c, s, s, generator=gen).to(device)
        # --speed-for ours: the switches are part of our recipe only (diffusers' training script sets neither).
        switches = args.speed_for == "both" or name == "ours"
        if args.channels_last and switches:
            self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **optimizer_kwargs(args.optim, name))
        self.forward = torch.compile(self.model) if args.compile and switches else self.model
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.is_diffusers = name == "diffusers"

    def loss(self) -> torch.Tensor:
        with self.autocast():
            if self.is_diffusers:
                out = self.forward(self.x, self.t, encoder_hidden_states=self.context).sample
            else:
                out = self.forward(self.x, self.t, context=self.context)
        return F.mse_loss(out.float(), self.target)  # the diffusion loss is always fp32

    def step(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema_update()

    def flops(self) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            self.loss().backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def saved_activation_bytes(self) -> int:
        """Bytes autograd keeps for backward: the activation memory of one step."""
        total, seen = 0, set()

        def pack(tensor):
            nonlocal total
            key = (tensor.untyped_storage().data_ptr(), tensor.dtype)
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return total


def optimizer_kwargs(optim: str, name: str) -> dict:
    """``recipe``: each side as its own training recipe sets AdamW up (ours: conf/optim/adamw.yaml, fused;
    diffusers' train_text_to_image.py: torch's default, which is the per-tensor loop on CPU, foreach on
    CUDA). Otherwise the same implementation for both."""
    if optim == "recipe":
        return {"fused": True} if name == "ours" else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[optim]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul: the attainable peak that MFU is measured against."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def time_steps(runner: Runner, steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch", type=int, default=None, help="override the size's batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets (not the EMA copies)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--speed-for", choices=["both", "ours"], default="both",
                        help="apply --compile/--channels-last to both models (same config) or to ours only "
                             "(each side's recipe: diffusers' train_text_to_image.py uses neither)")
    parser.add_argument("--optim", choices=["recipe", "fused", "foreach", "loop"], default="recipe",
                        help="AdamW implementation (see optimizer_kwargs); EMA: ours vs diffusers' EMAModel "
                             "with foreach unless --optim recipe/loop (its default per-tensor loop)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per model")
    parser.add_argument("--steps", type=int, default=3, help="training steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    device = torch.device(args.device)
    size = SIZES[args.size]
    if args.batch:
        size.batch = args.batch
    ours = build_ours(size)
    theirs = build_diffusers(size, ours)
    n_ours, n_theirs = (sum(p.numel() for p in m.parameters()) for m in (ours, theirs))
    print(f"parameters: ours {n_ours:,}  diffusers {n_theirs:,}  (ratio {n_ours / n_theirs:.4f})")

    ema = EMA(ours, EMAConfig(decay=0.9999)).to(device)
    their_ema = EMAModel(theirs.parameters(), decay=0.9999, foreach=args.optim in ("fused", "foreach"))
    runners = [
        Runner("ours", ours, lambda: ema.update(ours), args, size, device),
        Runner("diffusers", theirs, None, args, size, device),
    ]
    their_ema.to(device)
    runners[1].ema_update = lambda: their_ema.step(theirs.parameters())

    peak_dtype = torch.bfloat16 if args.precision == "bf16" and device.type == "cuda" else torch.float32
    flops = {r.name: r.flops() for r in runners}
    activations = {r.name: r.saved_activation_bytes() for r in runners}
    for r in runners:
        for _ in range(args.warmup):
            r.step()
    # On a shared machine the attainable speed drifts: every round re-measures the matmul peak next to
    # the two models' steps, and ratios/MFU are taken within a round, then the median over rounds.
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    peaks: list[float] = []
    for i in range(args.rounds):
        peaks.append(matmul_peak(device, peak_dtype))
        for r in runners if i % 2 == 0 else runners[::-1]:  # alternate which goes first
            times[r.name].append(time_steps(r, args.steps, device))
    peak_mem = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    print(f"device: {device} ({platform.processor() or platform.machine()}), threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, precision {args.precision}, compile {args.compile}, "
          f"channels_last {args.channels_last} (for {args.speed_for}), AdamW/EMA implementation: {args.optim}")
    print(f"size {args.size}: {size}")
    print(f"measured {peak_dtype} matmul peak per round: median {statistics.median(peaks) / 1e9:.1f} GFLOP/s "
          f"(min {min(peaks) / 1e9:.1f}, max {max(peaks) / 1e9:.1f})")
    header = f"{'model':<10} {'step ms':>9} {'img/s':>8} {'GFLOP/step':>11} {'MFU':>6} {'act MiB':>8}"
    print(header + "\n" + "-" * len(header))
    for r in runners:
        step = statistics.median(times[r.name])
        mfu = statistics.median(flops[r.name] / t / p for t, p in zip(times[r.name], peaks))
        print(f"{r.name:<10} {step * 1e3:9.1f} {size.batch / step:8.1f} {flops[r.name] / 1e9:11.2f} {mfu:6.1%} "
              f"{activations[r.name] / 2**20:8.1f}")
    ratios = [d / o for o, d in zip(times["ours"], times["diffusers"])]
    print(f"ours / diffusers throughput: median {statistics.median(ratios):.3f}x over {len(ratios)} rounds "
          f"(per round: {[round(x, 3) for x in ratios]})")
    if peak_mem is not None:
        print(f"peak CUDA memory (both models): {peak_mem:.0f} MiB")


if __name__ == "__main__":
    main()
