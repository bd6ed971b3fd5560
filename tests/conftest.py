"""Shared test set-up: CPU only, offline, few threads, and a Hydra compose helper."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ldm.config import register_resolvers  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
register_resolvers()


def compose_train(overrides: list[str], tmp_path: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as ldm-train would, with the run folder under ``tmp_path``."""
    extra = []
    if tmp_path is not None:
        extra = [f"paths.output_dir={tmp_path}"]
        if not any(o.startswith("paths.cache_dir=") for o in overrides):
            extra.append(f"paths.cache_dir={tmp_path / 'cache'}")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, *extra])


@pytest.fixture(scope="session")
def compose_cfg():
    return compose_train


@pytest.fixture(scope="session")
def tiny_vae_export(tmp_path_factory) -> Path:
    """A stage-1 export of the default autoencoder after debug=fast steps: a first stage for stage-2 tests."""
    from ldm.train import train

    out = tmp_path_factory.mktemp("tiny_vae")
    train(compose_train(["stage=vae", "debug=fast", "logger=csv", "data.batch_size=8"], out))
    return out / "export"
