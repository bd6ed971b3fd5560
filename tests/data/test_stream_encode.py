"""ldm-prepare encode=true: latent moments and caption embeddings in the shards, keyed by the networks' weights."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from ldm.data.shard_encoding import check_encoded
from ldm.data.shards import INDEX, ShardError
from ldm.io.first_stage import from_export
from ldm.nets.conditioners.text import precomputed_context
from ldm.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_stream import datamodule, prepare_shards, run, write_images  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    run(["stage=vae", "debug=fast", "logger=csv", "data.batch_size=16", f"hydra.run.dir={out}"])
    return out / "export"

ENCODE = ["encode=true", "encode_settings.image_size=32", "encode_settings.mode=L", "encode_batch_size=5"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("encode")
    write_images(root / "img", 12)
    return root / "img"


@pytest.fixture(scope="module")
def encoded(images, export) -> Path:
    out = images.parent / "encoded"
    result = prepare_shards(images, out, *ENCODE, f"first_stage.path={export}")
    assert result["encode"]["flips"] and result["encode"]["latent_dtype"] == "float32"
    return out


def stage2(export: Path, shards: Path, *extra: str) -> list[str]:
    return ["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={export}", "debug=fast", "logger=csv", "data=stream",
            f"data.path={shards}", "data.mode=L", "data.image_size=32", "data.batch_size=4", "data.num_workers=0",
            "stage.final_samples.enabled=false", "stage.max_steps=1", *extra,
            *([] if any(e.startswith("cond=") for e in extra) else ["cond.num_classes=2"])]


def test_shard_latents_are_the_first_stage_moments_of_the_decoded_and_flipped_images(encoded, export):
    live, cached = datamodule(encoded, use_latents=False), datamodule(encoded)
    first_stage = from_export(str(export))
    for image_batch, latent_batch in zip(live.train_dataloader(), cached.train_dataloader()):
        assert torch.equal(image_batch["id"], latent_batch["id"]) and "image" not in latent_batch
        mean, std = first_stage.encode_moments(image_batch["image"])  # the same flips were drawn on both paths
        torch.testing.assert_close(latent_batch["latent_mean"], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(latent_batch["latent_std"], std, rtol=1e-5, atol=1e-6)


def test_training_from_shard_latents_gives_the_loss_of_encoding_on_the_fly(encoded, export, compose_cfg, tmp_path):
    live = train(compose_cfg(stage2(export, encoded, "data.use_latents=false"), tmp_path / "live"))
    cached = train(compose_cfg(stage2(export, encoded), tmp_path / "cached"))
    assert cached["train/loss"] == pytest.approx(live["train/loss"], rel=1e-5)


def test_latents_of_another_first_stage_or_geometry_are_refused(encoded, export, compose_cfg, tmp_path):
    forged = tmp_path / "forged"
    shutil.copytree(encoded, forged)
    index = json.loads((forged / INDEX).read_text())
    index["ldm"]["encode"]["first_stage"] = "0" * 64
    (forged / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="encoded by another first stage.*ldm-prepare encode=true.*use_latents=false"):
        train(compose_cfg(stage2(export, forged), tmp_path / "run"))
    meta = json.loads((encoded / INDEX).read_text())["ldm"]["encode"]
    first_stage = from_export(str(export))
    with pytest.raises(ValueError, match="encoded at image_size=32, data.image_size=28"):
        check_encoded(meta, first_stage, None, 28, "L", False, True, "x")
    with pytest.raises(ValueError, match="centre crops: set data.random_crop=false"):
        check_encoded(meta, first_stage, None, 32, "L", True, True, "x")
    with pytest.raises(ValueError, match="without mirrored copies"):
        check_encoded({**meta, "flips": False}, first_stage, None, 32, "L", False, True, "x")


def test_caption_embeddings_reproduce_the_frozen_text_encoder(images, export, compose_cfg, tmp_path):
    out = tmp_path / "text"
    result = prepare_shards(images, out, *ENCODE, f"first_stage.path={export}", "cond=text",
                            "encode_settings.flips=false", "encode_settings.latent_dtype=float16")
    assert result["encode"]["text_encoder"]["dim"] == 384
    batch = next(iter(datamodule(out, random_flip=False).train_dataloader()))
    assert batch["caption_embedding"].shape == (4, 32, 384) and batch["latent_mean"].dtype == torch.float32
    conditioner = instantiate(compose_cfg(["cond=text"]).cond.conditioner)
    encoder = conditioner.embedders[0]
    drop = torch.tensor([False, True, False, False])
    expected = encoder.encode(batch["caption"], drop)
    got = precomputed_context(batch["caption_embedding"], drop, encoder.unconditional(1))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # float16 storage
    # the embedder itself takes the precomputed tokens when the batch carries them (the encoder does not run)
    through = encoder({"caption": batch["caption"], "caption_embedding": batch["caption_embedding"]}, drop=drop)
    # Exact against the tokens of "" the embedder kept (the same tensor, by construction); the text encoder
    # run on "" in another call agrees to fp32 rounding only: BLAS kernels may differ between two calls.
    kept_null = encoder._null_tokens()
    torch.testing.assert_close(through, precomputed_context(batch["caption_embedding"], drop, kept_null),
                               rtol=0, atol=0)
    torch.testing.assert_close(through, got, rtol=1e-5, atol=1e-5)
    # the encoder ran once, for "" (kept for later batches), and never on the batch's captions
    runs = []
    original = encoder._run_encoder
    encoder._run_encoder = lambda captions: runs.append(list(captions)) or original(captions)
    encoder({"caption": batch["caption"], "caption_embedding": batch["caption_embedding"]}, drop=drop)
    assert runs == []
    meta = result["encode"]
    assert check_encoded(meta, from_export(str(export)), conditioner, 32, "L", False, False, "x")
    encoder.max_length = 16
    with pytest.raises(ValueError, match="made by another text encoder"):
        check_encoded(meta, from_export(str(export)), conditioner, 32, "L", False, False, "x")
    with pytest.raises(ValueError, match=r"\(max_length, dim\)"):
        precomputed_context(batch["caption_embedding"], drop, torch.zeros(16, 384))


def test_a_text_conditioned_run_on_shards_without_captions_is_refused(images, export, compose_cfg, tmp_path):
    prepare_shards(images, tmp_path / "plain", "source.captions=false")
    with pytest.raises(ShardError, match="cond reads captions but the shards .* have none"):
        train(compose_cfg(stage2(export, tmp_path / "plain", "cond=text"), tmp_path / "run"))
