"""A tiny Stable-Diffusion-shaped model built with diffusers and transformers from configs (random weights),
saved as a diffusers pipeline folder and as a CompVis single file, plus a captioned image folder."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.diffusion.schedules import NoiseSchedule
from ldm.io.convert import (
    autoencoder_from_diffusers,
    autoencoder_from_diffusers_config,
    unet_from_diffusers,
    unet_from_diffusers_config,
)

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                   down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=64, attention_head_dim=8)  # 8 heads, as SD-1.x
VAE_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  sample_size=16, scaling_factor=0.5)
SCALE = 0.5
CHARS = list(string.ascii_lowercase + string.digits)


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return module.eval()


def tokenizer_and_text_model():
    """A random CLIP text model (width 64 = one 64-channel head, as CLIP's head width) with a real CLIP
    byte-level BPE tokenizer over letters and digits."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *CHARS, *[c + "</w>" for c in CHARS]])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)  # CLIP's; pipelines pad to it
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                            pad_token_id=1)
    torch.manual_seed(0)
    return tokenizer, CLIPTextModel(config).eval()


def build(folder: Path, prediction: str = "epsilon") -> dict:
    """Write ``folder/diffusers`` (pipeline folder), ``folder/sd.safetensors`` (CompVis single file),
    ``folder/tokenizer``; returns the diffusers modules."""
    import diffusers

    unet = randomize(diffusers.UNet2DConditionModel(**UNET_CONFIG), 1)
    with torch.no_grad():  # attention logits of order 1, so that the head layout shows in the outputs
        for name, param in unet.named_parameters():
            if name.endswith(("to_q.weight", "to_k.weight")):
                param.mul_(8.0)
    vae = randomize(diffusers.AutoencoderKL(**VAE_CONFIG), 2, 0.05)
    tokenizer, text_model = tokenizer_and_text_model()
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        prediction_type=prediction, clip_sample=False)
    pipe = folder / "diffusers"
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_model), ("tokenizer", tokenizer),
                       ("scheduler", scheduler)):
        part.save_pretrained(pipe / name)
    # what StableDiffusionPipeline.save_pretrained writes, so that from_pretrained(folder) reads it alone
    (pipe / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False}))
    tokenizer.save_pretrained(folder / "tokenizer")

    kwargs = unet_from_diffusers_config(dict(unet.config))
    ddconfig, _ = autoencoder_from_diffusers_config(dict(vae.config))
    tensors = {f"model.diffusion_model.{k}": v for k, v in unet_from_diffusers(unet.state_dict(), kwargs).items()}
    tensors.update({f"first_stage_model.{k}": v for k, v in autoencoder_from_diffusers(vae.state_dict(), ddconfig).items()})
    # SD-1.x files nest the CLIP tower under text_model., as transformers 4 named it
    tensors.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text_model.state_dict().items()})
    tensors["betas"] = NoiseSchedule("scaled_linear", 1000).betas.float()
    tensors["scale_factor"] = torch.tensor(SCALE)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sd.safetensors"))
    return {"unet": unet, "vae": vae, "text_model": text_model, "tokenizer": tokenizer, "scheduler": scheduler}


def image_folder(root: Path, n: int = 8, size: int = 32, caption: str = "a red square") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "caption": f"{caption} {i}"}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def stage2(tiny: Path, *extra: str) -> list[str]:
    """A few-step stage-2 run on the tiny image folder (32 px RGB, captions), nothing sampled."""
    return ["stage=ldm", "data=folder", f"data.root={tiny / 'images'}", "data.image_size=32", "data.num_workers=0",
            "data.val_fraction=0.25", "debug=fast", "logger=csv", "data.batch_size=2", "trainer.deterministic=true",
            "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0", *extra]


def compvis(tiny: Path) -> list[str]:
    return ["init=compvis", f"init.path={tiny / 'sd.safetensors'}", f"init.tokenizer={tiny / 'tokenizer'}",
            "init.prediction=eps"]


def diffusers_init(tiny: Path) -> list[str]:
    return ["init=diffusers", f"init.path={tiny / 'diffusers'}"]
