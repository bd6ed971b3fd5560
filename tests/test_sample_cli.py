"""``ldm-sample`` through its Hydra composition, on a tiny stage-2 export trained here (a few steps of each
stage): seeded determinism, the samples.npz format, the manifest, guidance sweeps, input errors, img2img and
inpainting, and ``ldm-evaluate model=...`` on the same export."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import ConfigError
from ldm.data.mnist5k import load_mnist5k_arrays
from ldm.io.export import read_export, save_export
from ldm.io.load import load_ldm
from ldm.model import FirstStage
from ldm.sample import run
from ldm.train import train

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
FAST = ["debug=fast", "logger=csv", "data.batch_size=16"]
FAST_SAMPLER = ["sampler=ddim", "sampler.steps=4"]


@pytest.fixture(scope="module")
def export(tmp_path_factory, compose_cfg) -> Path:
    vae_out, ldm_out = tmp_path_factory.mktemp("vae"), tmp_path_factory.mktemp("ldm")
    train(compose_cfg(["stage=vae", *FAST], vae_out))
    train(compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_out / 'export'}", *FAST,
                       "stage.final_samples.enabled=false"], ldm_out))
    return ldm_out / "export"


@pytest.fixture(scope="module")
def lively(export, tmp_path_factory) -> Path:
    """The export with its zero-initialised layers (output convs, attention projections) given small random
    weights: after four training steps they are still ~0, so the prediction would ignore input and class
    (eps_hat ~ 0) and guidance scales or seeds could not change anything."""
    tensors, config, meta = read_export(export, kind="ldm")
    generator = torch.Generator().manual_seed(0)
    for name, value in tensors.items():
        if name.startswith("model.diffusion_model.") and value.ndim >= 2 and value.abs().max() < 1e-3:
            tensors[name] = 0.02 * torch.randn(value.shape, generator=generator)
    return save_export(tmp_path_factory.mktemp("lively") / "export", tensors, OmegaConf.to_container(config), meta)


def compose_sample(export: Path, out: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("sample", overrides=[f"model_path={export}", f"out_dir={out}", f"paths.output_dir={out}", *FAST_SAMPLER, *overrides])


def sample(export: Path, out: Path, *overrides: str) -> dict[str, np.ndarray]:
    run(compose_sample(export, out, list(overrides)))
    with np.load(out / "samples.npz") as stored:
        return dict(stored)


@pytest.fixture(scope="module")
def init_folder(tmp_path_factory) -> Path:
    """Two real digits (a 0 and a 1) as 28x28 PNGs; ldm-sample resizes them to the model's 32x32."""
    folder = tmp_path_factory.mktemp("init")
    images, labels = load_mnist5k_arrays()
    for digit in (0, 1):
        Image.fromarray(images[np.flatnonzero(labels == digit)[0]]).save(folder / f"{digit}.png")
    return folder


def init_latents(export: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The init digits as ldm-sample reads them (32x32 bicubic), their scaled posterior-mean latents, and
    their autoencoder reconstruction: the closest any edit can come to them through this decoder."""
    pixels = np.stack([np.asarray(Image.open(f).convert("L").resize((32, 32), Image.BICUBIC))
                       for f in sorted(folder.glob("*.png"))])
    first_stage = load_ldm(export)[0].first_stage
    mean, _ = first_stage.encode_moments(torch.from_numpy(pixels).float()[:, None] / 127.5 - 1)
    z0 = mean * first_stage.scale_factor
    recon = ((first_stage.decode(z0).clamp(-1, 1) + 1) * 127.5).round()[:, 0]
    return z0, recon.numpy()


def test_same_seed_same_images_different_seed_different(lively, tmp_path):
    first = sample(lively, tmp_path / "a", "labels=[3,7]", "n=2", "seed=5")
    second = sample(lively, tmp_path / "b", "labels=[3,7]", "n=2", "seed=5")
    other = sample(lively, tmp_path / "c", "labels=[3,7]", "n=2", "seed=6")
    np.testing.assert_array_equal(first["arr_0"], second["arr_0"])
    assert np.abs(first["arr_0"].astype(int) - other["arr_0"]).mean() > 1.0


def test_samples_npz_format_pngs_grid_and_manifest(export, tmp_path):
    arrays = sample(export, tmp_path, "labels=[2,5,9]", "n=2", "guidance_scale=2.0")
    images, labels = arrays["arr_0"], arrays["labels"]
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 1)
    assert np.issubdtype(labels.dtype, np.integer) and labels.tolist() == [2, 2, 5, 5, 9, 9]
    assert set(arrays) == {"arr_0", "labels"}
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / "00003.png"))[..., 0], images[3, ..., 0])
    assert (tmp_path / "grid.png").is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["guidance_scale"] == 2.0 and manifest["count"] == 6
    assert manifest["sampler"] == {"name": "ddim", "steps": 4, "eta": 0.0, "timestep_spacing": "trailing"}
    assert manifest["model_sha256"] == hashlib.sha256((export / "model.safetensors").read_bytes()).hexdigest()


def test_the_manifest_reproduces_the_run(lively, tmp_path):
    original = sample(lively, tmp_path / "first", "labels=[1,4]", "n=2", "seed=11", "guidance_scale=1.5")
    settings = json.loads((tmp_path / "first" / "manifest.json").read_text())["command"]
    settings["out_dir"] = str(tmp_path / "again")
    run(OmegaConf.create(settings))
    with np.load(tmp_path / "again" / "samples.npz") as again:
        np.testing.assert_array_equal(again["arr_0"], original["arr_0"])
        np.testing.assert_array_equal(again["labels"], original["labels"])


def test_guidance_scale_list_gives_one_folder_per_scale(lively, tmp_path):
    results = run(compose_sample(lively, tmp_path, ["labels=[0]", "n=2", "guidance_scale=[1,4]"]))
    assert sorted(results) == [1.0, 4.0]
    unguided = np.load(tmp_path / "guidance_scale=1" / "samples.npz")["arr_0"]
    guided = np.load(tmp_path / "guidance_scale=4" / "samples.npz")["arr_0"]
    assert unguided.shape == guided.shape == (2, 32, 32, 1)
    assert not np.array_equal(unguided, guided)
    assert json.loads((tmp_path / "guidance_scale=4" / "manifest.json").read_text())["guidance_scale"] == 4.0


def test_bad_conditions_fail_with_a_clear_error(export, tmp_path):
    with pytest.raises(ConfigError, match="prompts_file=.*does not exist"):
        run(compose_sample(export, tmp_path, [f"prompts_file={tmp_path / 'missing.txt'}"]))
    with pytest.raises(ConfigError, match=r"labels \[10, -1\] are outside the model's classes 0..9"):
        run(compose_sample(export, tmp_path, ["labels=[3,10,-1]"]))
    with pytest.raises(ConfigError, match="this model takes no text"):
        run(compose_sample(export, tmp_path, ["prompts=[a three]"]))
    with pytest.raises(ConfigError, match="mask needs init_images"):
        run(compose_sample(export, tmp_path, [f"mask={tmp_path}"]))
    assert not (tmp_path / "samples.npz").exists()


def test_img2img_stays_closer_to_the_init_image_as_strength_decreases(export, tmp_path, init_folder):
    _, recon = init_latents(export, init_folder)
    common = ["labels=[0,1]", "n=1", "guidance_scale=1.0"]
    distance = {}
    for strength in (0.2, 0.5, 0.8):
        out = sample(export, tmp_path / f"s{strength}", *common, f"init_images={init_folder}", f"strength={strength}")
        distance[strength] = np.abs(out["arr_0"][..., 0] - recon).mean()
    pure = sample(export, tmp_path / "pure", *common)["arr_0"][..., 0]
    distance[1.0] = np.abs(pure - recon).mean()
    assert distance[0.2] < distance[0.5] < distance[0.8] < distance[1.0], distance
    assert distance[0.2] < 0.3 * distance[1.0], distance


def test_inpainting_keeps_the_kept_region(lively, tmp_path, init_folder, monkeypatch):
    """Checked on the latents the decoder receives: the four-step stage-1 decoder of this fixture mixes
    regions and reconstructs poorly, so pixels would measure it rather than the masking."""
    z0, _ = init_latents(lively, init_folder)
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255  # white = keep: the top half, latent rows 0-3 at f=4
    Image.fromarray(mask).save(tmp_path / "mask.png")
    decoded: list[torch.Tensor] = []
    original_decode = FirstStage.decode

    def recording_decode(self, z):
        decoded.append(z.clone())
        return original_decode(self, z)

    monkeypatch.setattr(FirstStage, "decode", recording_decode)
    common = ["labels=[0,1]", "n=1", f"init_images={init_folder}", "strength=0.8"]
    sample(lively, tmp_path / "inpaint", *common, f"mask={tmp_path / 'mask.png'}")
    sample(lively, tmp_path / "sdedit", *common)
    sample(lively, tmp_path / "from_noise", *common[:-1], "strength=null", f"mask={tmp_path / 'mask.png'}")
    inpainted, edited, from_noise = decoded
    for kept in (inpainted, from_noise):
        torch.testing.assert_close(kept[:, :, :4], z0[:, :, :4], rtol=0, atol=1e-5)
    assert (inpainted[:, :, 4:] - z0[:, :, 4:]).abs().mean() > 0.5  # the rest is generated
    assert (from_noise[:, :, 4:] - z0[:, :, 4:]).abs().mean() > (inpainted[:, :, 4:] - z0[:, :, 4:]).abs().mean()
    assert (edited[:, :, :4] - z0[:, :, :4]).abs().mean() > 0.5  # without the mask the top changes too


def test_evaluate_model_mode_generates_then_measures(export, tmp_path, request):
    from ldm.evaluate import evaluate

    store = getattr(request.config, "cache", None)  # the reference-feature cache shared with tests/test_evaluate.py
    cache = Path(store.mkdir("ldm-eval-cache")) if store is not None else tmp_path / "cache"
    overrides = [f"model_path={export}", "n=3", "metrics=[fid,accuracy]", *FAST_SAMPLER,
                 f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    report = evaluate(cfg)
    assert report["metrics"]["fid"]["n"] == report["metrics"]["accuracy"]["n"] == 30
    with np.load(tmp_path / "samples.npz") as stored:
        assert stored["arr_0"].shape == (30, 32, 32, 1) and stored["labels"].tolist() == sorted(list(range(10)) * 3)
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 0
    assert torch.isfinite(torch.tensor(report["metrics"]["fid"]["value"]))


def test_a_checkpoint_loads_with_its_run_config_and_one_of_another_model_is_refused(export, tmp_path):
    """model_path=<run>/checkpoints/last.ckpt rebuilds the model from <run>/config.yaml: the EMA UNet equals
    the export's; a checkpoint beside a config of another model size names the mismatch (no RuntimeError)."""
    from ldm.io.export import ExportError

    ckpt = export.parent / "checkpoints" / "last.ckpt"
    from_ckpt, _ = load_ldm(ckpt, use_ema=True)
    from_export, _ = load_ldm(export)
    theirs = from_export.backbone.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in from_ckpt.backbone.state_dict().items())
    other = tmp_path / "run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "last.ckpt").write_bytes(ckpt.read_bytes())
    config = OmegaConf.load(export.parent / "config.yaml")
    config.stage.module.model.backbone.model_channels = 2 * config.stage.module.model.backbone.model_channels
    OmegaConf.save(config, other / "config.yaml")
    with pytest.raises(ExportError, match=r"do not fit LatentDiffusion(.|\n)*shape of backbone.input_blocks.0.0.weight: checkpoint \(32, 3, 3, 3\) vs model \(64"):
        load_ldm(other / "checkpoints" / "last.ckpt")


def test_a_sample_count_that_is_not_a_number_names_the_key(tmp_path):
    """`ldm-sample n=abc` is refused in one line naming n, before any model is loaded."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "ignore", "-m", "ldm.sample", f"model_path={tmp_path / 'none'}",
                             "n=abc", f"out_dir={tmp_path / 'out'}", f"paths.root_dir={tmp_path}"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ldm-sample: error: n='abc' is not a whole number"), result.stderr
