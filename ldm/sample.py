"""``ldm-sample``: images from a trained latent diffusion model (Hydra app, conf/sample.yaml).

    ldm-sample model_path=outputs/ldm/<run>/export labels=[3,7] n=16 sampler=dpmpp_2m guidance_scale=[1,3]
    ldm-sample model_path=... prompts='["draw a 3"]' init_images=in/ strength=0.5
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from rich.progress import Progress

from ldm import distributed
from ldm.backends import set_tf32
from ldm.cli import run_cli
from ldm.config import ConfigError, register_resolvers, user_errors_as_messages
from ldm.io.images import save_png, to_uint8_grid
from ldm.io.samples import open_images, sample_to_npz, write_manifest
from ldm.model import LatentDiffusion, LatentEdit
from ldm.model.inpainting import inpaint_condition
from ldm.model.latent_diffusion import sampling_autocast
from ldm.model.sharded import SampleBatch

register_resolvers()
# An absolute path: relative ones would be resolved against the `ldm` package, where conf/ is not.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Bad input: ValueError and its kin (ConfigError, ExportError), and OSError for the files the user names
# (an unreadable image is PIL's UnidentifiedImageError, an OSError).
USER_ERRORS = (ValueError, OSError)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# The scale an export trained before final samples recorded one (or a converted model) is sampled at, with plain
# CFG as such an export records no method either: plain CFG's best on the default model (experiments/recipe).
DEFAULT_GUIDANCE_SCALE = 1.75


def guidance_scales(value: Any, info: dict[str, Any]) -> list[float]:
    """``guidance_scale`` as a list; null = the scale the model's own final samples used (its export's
    ``guidance_scale``, or a run config's ``stage.final_samples.guidance_scale`` for a .ckpt), so ldm-sample,
    ldm-evaluate and training agree by default."""
    if value is None:
        config = info.get("config") or {}
        value = config.get("guidance_scale")
        if value is None:
            value = ((config.get("stage") or {}).get("final_samples") or {}).get("guidance_scale", DEFAULT_GUIDANCE_SCALE)
    return [float(s) for s in (value if isinstance(value, (list, ListConfig)) else [value])]
GRID_IMAGES = 256  # images in grid.png at most (the npz and the PNG files hold them all)


def file_hash(path: Path) -> str:
    """sha256 of the weights the samples came from (the export's safetensors, or the .ckpt)."""
    target = path / "model.safetensors" if path.is_dir() else path
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_prompts(cfg: DictConfig) -> list[str] | None:
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise ConfigError(f"prompts_file={path} does not exist")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompts_file={path} holds no prompts (one per line)")
        return prompts
    if cfg.prompts is None:
        return None
    return [str(p) for p in (cfg.prompts if isinstance(cfg.prompts, ListConfig) else [cfg.prompts])]


def samples_per_condition(cfg: DictConfig) -> int:
    try:
        n = int(cfg.n)
    except (TypeError, ValueError):
        raise ConfigError(f"n={cfg.n!r} is not a whole number: set n to the samples per condition (e.g. n=16)") from None
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    return n


def build_conditions(cfg: DictConfig, model: LatentDiffusion) -> dict[str, Any]:
    """n samples per label or per prompt, condition-major (the model's conditioner makes the inputs);
    unconditional when neither applies."""
    n = samples_per_condition(cfg)
    conditioner = model.conditioner
    prompts = read_prompts(cfg)
    if conditioner.takes_prompts and not prompts:
        raise ConfigError("this model is text-conditional: give prompts=[...] or prompts_file=...")
    if prompts and not conditioner.takes_prompts:
        raise ConfigError("this model takes no text: remove prompts (use labels=[...] for a class model)")
    labels = None
    num_classes = conditioner.num_classes
    if num_classes and (cfg.labels is not None or not prompts):
        labels = list(range(num_classes)) if cfg.labels is None else [int(y) for y in cfg.labels]
        bad = [y for y in labels if not 0 <= y < num_classes]
        if bad:
            raise ConfigError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    return conditioner.example_conditions(n, labels=labels, prompts=prompts or None)


def load_images(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """A file or a folder of images -> (N, C, size, size) in [-1, 1]."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise ConfigError(f"no images at {path}")
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(Image.open(f).convert(mode).resize((size, size), Image.BICUBIC)) for f in files]
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1
    return x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)


def build_edit(cfg: DictConfig, sampler: LatentDiffusion, image_size: int, count: int) -> LatentEdit | None:
    if cfg.init_images is None:
        if cfg.mask is not None:
            raise ConfigError("mask needs init_images (the image to inpaint)")
        return None
    channels = sampler.first_stage.autoencoder.config.in_channels
    images = load_images(cfg.init_images, image_size, channels).to(sampler.device)
    # One init image per sample: repeated cyclically over the conditions.
    images = images[torch.arange(count) % images.shape[0]]
    mean, _ = sampler.first_stage.encode_moments(images)
    z0 = mean * sampler.first_stage.scale_factor  # the posterior mean: editing keeps the image's content
    keep = None
    # strength=null means 1.0: start from pure noise (the usual choice for inpainting).
    strength = 1.0 if cfg.strength is None else float(cfg.strength)
    if cfg.mask is not None:
        mask = load_images(cfg.mask, image_size, 1)[:1].to(sampler.device)  # white = keep
        f = sampler.first_stage.downsample_factor
        keep = torch.nn.functional.avg_pool2d((mask + 1) / 2, f).round().expand(count, 1, -1, -1)
    return LatentEdit(z0, strength, keep)


def inpaint_model_condition(cfg: DictConfig, sampler: LatentDiffusion, image_size: int, count: int) -> torch.Tensor:
    if cfg.init_images is None or cfg.mask is None:
        raise ConfigError("this is an inpainting model (cond=inpaint): give init_images=... and mask=... (white = keep)")
    channels = sampler.first_stage.autoencoder.config.in_channels
    images = load_images(cfg.init_images, image_size, channels).to(sampler.device)
    images = images[torch.arange(count) % images.shape[0]]
    keep = (load_images(cfg.mask, image_size, 1)[:1].to(sampler.device) + 1) / 2
    holes = (1 - keep).round().expand(count, 1, -1, -1)
    return inpaint_condition(sampler.first_stage, images, holes)


def sampling_guidance(cfg: DictConfig, model: LatentDiffusion, model_path: Path,
                      info: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the resolved guidance, its manifest record). ``guidance=`` given: that; else the method, band and guide the
    model's own final samples used (its export records them), so ldm-sample, ldm-evaluate and training agree by
    default; else (a model exported before the record) plain CFG. Autoguidance's guide is loaded and checked
    here, before any sample is drawn."""
    from ldm.io.guide import guidance_config, model_guidance, resolve_guidance

    if cfg.get("guidance") is not None:
        config, source = guidance_config(cfg.guidance), "command line"
    else:
        config, source = model_guidance(info, model_path), "model"
        if config is None:
            config, source = guidance_config(None), "default (the model records no guidance: plain CFG)"
    return resolve_guidance(config, model, str(model_path)), {**config.describe(), "source": source}


def sampling_precision(cfg: DictConfig, info: dict[str, Any], device: torch.device | str) -> torch.dtype | None:
    """The backbone's autocast dtype: ``precision=auto`` takes the training run's (``trainer.precision``)."""
    precision = str(cfg.get("precision", "auto"))
    if precision == "auto":
        precision = OmegaConf.select(OmegaConf.create(info.get("config") or {}), "trainer.precision")
    return sampling_autocast(device, precision)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Under ``torchrun`` the ranks share the batches of each guidance scale (the same images as one process
    draws); each writes its PNGs and its part of ``samples.npz``, which rank 0 joins."""
    from ldm.io.load import load_ldm

    samples_per_condition(cfg)  # before the model loads: a typo should not wait for it
    set_tf32(cfg.get("tf32"))
    distributed.init_from_environment()
    model_path = Path(str(cfg.model_path))
    sampler, info = load_ldm(model_path, distributed.local_device(), bool(cfg.use_ema))
    sampler_cfg = OmegaConf.to_container(cfg.sampler) if cfg.get("sampler") else dict(info["config"]["sampler"])
    image_size = int(cfg.image_size or info["config"]["data"]["image_size"])
    conditions = build_conditions(cfg, sampler)
    guidance, guidance_record = sampling_guidance(cfg, sampler, model_path, info)
    count = len(next(iter(conditions.values())))
    inpainting = [e for e in sampler.conditioner.embedders if e.needs_images]
    if inpainting:
        # An inpainting model (cond=inpaint) is told what to keep through its own condition.
        conditions[inpainting[0].input_key] = inpaint_model_condition(cfg, sampler, image_size, count)
        edit = None
    else:
        edit = build_edit(cfg, sampler, image_size, count)
    scales = guidance_scales(cfg.guidance_scale, info)
    for scale in scales:
        if float(scale) < 0:
            raise ConfigError(f"guidance_scale must be >= 0, got {scale}")
    rescale = float(cfg.guidance_rescale)
    if not 0.0 <= rescale <= 1.0:
        raise ConfigError(f"guidance_rescale is a mixing weight in [0, 1], got {rescale}")
    autocast = sampling_precision(cfg, info, sampler.device)
    out_dir = Path(cfg.out_dir)
    results = {}
    for scale in scales:
        folder = out_dir / (f"guidance_scale={float(scale):g}" if len(scales) > 1 else "")
        with Progress(disable=distributed.rank() != 0) as progress:
            task = progress.add_task(f"sampling (cfg {float(scale):g})", total=count)

            def written(batch: SampleBatch, task: Any = task, progress: Any = progress, folder: Path = folder) -> None:
                if cfg.save_pngs:
                    for i, array in enumerate(batch.images, start=batch.start):
                        save_png(array if array.shape[-1] == 3 else np.repeat(array, 3, axis=-1), folder / "images" / f"{i:05d}.png")
                progress.advance(task, len(batch.images) * distributed.world_size())

            npz = sample_to_npz(sampler, conditions, image_size, int(cfg.seed), folder / "samples.npz",
                                batch_size=int(cfg.batch_size), on_batch=written, sampler=dict(sampler_cfg),
                                guidance_scale=float(scale), guidance_rescale=rescale, guidance=guidance, edit=edit,
                                autocast_dtype=autocast)
        if distributed.rank() == 0:
            # The grid shows the first GRID_IMAGES: a 1,000-class set would otherwise be one PNG of 8,000 images.
            shown = np.array(open_images(npz)[: min(count, GRID_IMAGES)])
            grid = torch.from_numpy(shown).permute(0, 3, 1, 2).float() / 127.5 - 1
            save_png(to_uint8_grid(grid, nrow=int(cfg.n)), folder / "grid.png")
            write_manifest(folder / "manifest.json", {
                "command": OmegaConf.to_container(cfg, resolve=True), "sampler": sampler_cfg,
                "guidance_scale": float(scale), "guidance_rescale": rescale, "guidance": guidance_record,
                "seed": int(cfg.seed),
                "image_size": image_size, "model": str(model_path), "model_sha256": file_hash(model_path),
                "count": count, "batch_size": int(cfg.batch_size), "world_size": distributed.world_size(),
            })
            print(f"samples (cfg {float(scale):g}): {npz}, grid: {folder / 'grid.png'}", flush=True)
        results[float(scale)] = str(npz)
    return results


def main() -> None:
    run_cli("ldm-sample", CONF_DIR, "sample", __doc__, hydra_main)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def hydra_main(cfg: DictConfig) -> None:
    with user_errors_as_messages("ldm-sample", USER_ERRORS):
        run(cfg)


if __name__ == "__main__":
    main()
