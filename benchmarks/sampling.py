"""Images per second of each sampler (conf/sampler/*.yaml, at its default steps), with and without
classifier-free guidance, through LatentSampler.sample (conditioner, UNet, sampler loop, VAE decode)
on the default recipe (MNIST-5k 32 px, kl_f4 export, unet_small, cond=class).

    python benchmarks/sampling.py                          # builds a 4-step stage-1 export first
    python benchmarks/sampling.py --export outputs/<run>/export --images 64

Network calls per image: steps (ddim, ddpm, euler, dpmpp_2m) or 2*steps-1 (heun); CFG doubles each
call's batch. Untrained weights cost the same as trained ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage2_epoch import compose_train, ensure_export  # noqa: E402

from ldm.config import instantiate_checked  # noqa: E402
from ldm.train import CONF_DIR  # noqa: E402

SAMPLERS = sorted(p.stem for p in (Path(CONF_DIR) / "sampler").glob("*.yaml"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", default=None, help="stage-1 export folder (default: train a 4-step one)")
    parser.add_argument("--images", type=int, default=64, help="images per measurement (one batch)")
    parser.add_argument("--samplers", nargs="*", default=SAMPLERS)
    parser.add_argument("--guidance", type=float, default=3.0, help="CFG scale of the guided runs")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra ldm-train overrides")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        export = ensure_export(args.export, Path(tmp))
        cfg = compose_train(["stage=ldm", f"first_stage.path={export}", f"paths.output_dir={tmp}", *args.overrides])
        module = instantiate_checked(cfg.stage.module, "stage.module").eval()
    sampler = module.sampler()
    labels = torch.arange(args.images) % int(cfg.cond.num_classes)
    image_size = int(cfg.data.image_size)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.images} images of {image_size} px "
          f"per run, UNet {cfg.model.ldm.backbone.model_channels}ch x {list(cfg.model.ldm.backbone.channel_mult)}")
    for scale in (1.0, args.guidance):  # first calls pay for oneDNN kernel selection: not timed
        sampler.sample({"label": labels}, image_size=image_size, sampler={"name": "ddim", "steps": 2},
                       guidance_scale=scale, batch_size=args.images)
    header = f"{'sampler':<10} {'steps':>5} {'img/s':>8} {'img/s CFG':>10} {'CFG cost':>9}"
    print(header + "\n" + "-" * len(header))
    for name in args.samplers:
        settings = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "sampler" / f"{name}.yaml"))
        rates = []
        for scale in (1.0, args.guidance):
            generator = torch.Generator().manual_seed(0)
            start = time.perf_counter()
            images = sampler.sample({"label": labels}, image_size=image_size, sampler=settings,
                                    guidance_scale=scale, generator=generator, batch_size=args.images)
            rates.append(images.shape[0] / (time.perf_counter() - start))
        print(f"{name:<10} {settings['steps']:5d} {rates[0]:8.2f} {rates[1]:10.2f} {rates[0] / rates[1]:8.2f}x")


if __name__ == "__main__":
    main()
