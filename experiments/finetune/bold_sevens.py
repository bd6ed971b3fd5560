"""LoRA demo data and measurements: teach the embedded default's text model a caption it never saw.

    python experiments/finetune/bold_sevens.py data --out outputs/finetune/data
    python experiments/finetune/bold_sevens.py measure --before <base export> --after <LoRA export> --out <dir>

``data`` writes ``bold/``: the sevens of MNIST-5k's training split, dilated (3x3 max filter: strokes about
two pixels wider), captioned "a bold seven", and ``prior/``: the training digits of every class with their
training captions (prior preservation, Ruiz et al. 2023), both 32x32 grayscale PNGs + captions.jsonl.
``measure`` samples both models through ``ldm-evaluate`` (the real entry point): the new caption (judge
accuracy as a 7, ink fraction and mean stroke width) and every digit with held-out prompts (accuracy, FID);
it writes ``results.md``, ``results.json`` and ``grid.png`` (before | after, the new caption).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PROMPT = "a bold seven"
SEVEN = 7


def training_digits(image_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images (N, 32, 32), labels, training-split indices) exactly as MNIST5kDataModule prepares them."""
    from ldm.data.base import stratified_split
    from ldm.data.mnist5k import load_mnist5k_arrays
    from ldm.data.tensor_images import fit_uint8_images

    images, labels = load_mnist5k_arrays()
    train_idx, _ = stratified_split(labels, 0.1, 0)  # conf/data/mnist5k.yaml: val_fraction 0.1, seed 0
    prepared = fit_uint8_images(torch.from_numpy(images).unsqueeze(1), image_size, "pad")[:, 0].numpy()
    return prepared, labels, train_idx


def embolden(images: np.ndarray) -> np.ndarray:
    """Grey-level dilation with a 3x3 square: every stroke grows by one pixel on each side."""
    x = torch.from_numpy(images).float()[:, None]
    return F.max_pool2d(x, 3, stride=1, padding=1)[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def write_folder(folder: Path, images: np.ndarray, captions: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file": f"{i:05d}.png", "caption": caption}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")


def make_data(out: Path) -> None:
    from ldm.data.captions import caption_for

    images, labels, train_idx = training_digits()
    sevens = train_idx[labels[train_idx] == SEVEN]
    write_folder(out / "bold", embolden(images[sevens]), [PROMPT] * len(sevens))
    write_folder(out / "prior", images[train_idx], [caption_for(int(labels[i]), np.random.default_rng(int(i))) for i in train_idx])
    print(f"{len(sevens)} bold sevens in {out / 'bold'}, {len(train_idx)} prior digits in {out / 'prior'}")


def stroke_statistics(images: np.ndarray) -> dict[str, float]:
    """Ink fraction (pixels > 127) and mean stroke width: the mean length of horizontal ink runs."""
    ink = images.reshape(len(images), images.shape[1], -1) > 127  # (N, H, W)
    padded = np.pad(ink, ((0, 0), (0, 0), (1, 1)))
    starts = (padded[..., 1:] & ~padded[..., :-1]).sum()
    return {"ink_fraction": float(ink.mean()), "stroke_width_px": float(ink.sum() / max(int(starts), 1))}


def evaluate(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "ldm.evaluate", *args], check=True)


def metrics_of(out: Path) -> dict:
    found = sorted(out.rglob("metrics.json"))
    return json.loads(found[-1].read_text()) if found else {}


def measure(before: Path, after: Path, out: Path, n: int, per_digit: int, scale: float) -> None:
    rows, grids = {}, []
    for name, model in (("before", before), ("after", after)):
        folder = out / name
        common = [f"model_path={model}", f"guidance_scale={scale}", "seed=0", "hydra.run.dir=" + str(folder / "hydra")]
        evaluate([*common, f"prompts=['{PROMPT}']", f"n={n}", "metrics=[]", f"out_dir={folder / 'new'}"])
        samples = np.load(folder / "new" / "samples.npz")
        images = samples["arr_0"][..., 0]
        np.savez(folder / "new_labelled.npz", arr_0=samples["arr_0"], labels=np.full(len(images), SEVEN))
        evaluate([f"samples={folder / 'new_labelled.npz'}", "metrics=[accuracy]", f"out_dir={folder / 'new_acc'}",
                  "hydra.run.dir=" + str(folder / "hydra_acc")])
        evaluate([*common, f"n={per_digit}", "metrics=[accuracy,fid]", f"out_dir={folder / 'digits'}"])
        rows[name] = {"new": metrics_of(folder / "new_acc").get("metrics", {}), "stroke": stroke_statistics(images),
                      "digits": metrics_of(folder / "digits").get("metrics", {})}
        grids.append(images[:32])  # the first 32 samples of the new caption
    images, labels, train_idx = training_digits()
    sevens = images[train_idx[labels[train_idx] == SEVEN]]
    rows["data"] = {"plain sevens": stroke_statistics(sevens), "bold sevens": stroke_statistics(embolden(sevens))}
    (out / "results.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    grids = [np.concatenate([g, np.zeros((32 - len(g), 32, 32), np.uint8)]) for g in grids]  # 4 x 8 tiles each
    tiles = [g.reshape(4, 8, 32, 32).transpose(0, 2, 1, 3).reshape(128, 256) for g in grids]
    grid = np.concatenate([tiles[0], np.full((128, 8), 255, np.uint8), tiles[1]], axis=1)  # before | after
    Image.fromarray(grid.astype(np.uint8), mode="L").resize((grid.shape[1] * 3, 384), Image.NEAREST).save(out / "grid.png")
    (out / "results.md").write_text(table(rows))
    print(table(rows))


def table(rows: dict) -> str:
    def value(metrics: dict, key: str, fmt: str) -> str:
        return format(metrics[key]["value"], fmt) if key in metrics else "n/a"

    lines = [f'| model | "{PROMPT}": judged a 7 | ink fraction | stroke width (px) | every digit: accuracy | every digit: FID(judge128) |',
             "|---|---|---|---|---|---|"]
    for name, label in (("before", "base (embedded text model)"), ("after", "LoRA fine-tuned")):
        row = rows[name]
        lines.append(f"| {label} | {value(row['new'], 'accuracy', '.1%')} (n={row['new'].get('accuracy', {}).get('n')}) "
                     f"| {row['stroke']['ink_fraction']:.3f} | {row['stroke']['stroke_width_px']:.2f} "
                     f"| {value(row['digits'], 'accuracy', '.1%')} | {value(row['digits'], 'fid', '.1f')} |")
    for name, stats in rows["data"].items():
        lines.append(f"| training data: {name} | | {stats['ink_fraction']:.3f} | {stats['stroke_width_px']:.2f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write bold/ and prior/ image folders")
    data.add_argument("--out", type=Path, required=True)
    meas = sub.add_parser("measure", help="sample and judge the base and the fine-tuned model")
    meas.add_argument("--before", type=Path, required=True)
    meas.add_argument("--after", type=Path, required=True)
    meas.add_argument("--out", type=Path, required=True)
    meas.add_argument("--n", type=int, default=200, help="samples of the new caption per model")
    meas.add_argument("--per-digit", type=int, default=100, help="samples per digit (held-out prompts)")
    meas.add_argument("--guidance-scale", type=float, default=1.75)
    args = parser.parse_args(argv)
    if args.command == "data":
        make_data(args.out)
    else:
        measure(args.before, args.after, args.out, args.n, args.per_digit, args.guidance_scale)


if __name__ == "__main__":
    main()
