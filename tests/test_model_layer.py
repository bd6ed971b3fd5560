"""The model layer's promises: a conditioner with a new batch key is one file plus one yaml (here written by the
test, as a user would), the deprecated `model.ldm.unet` spelling still works with a warning, and
LatentDiffusion trains and samples outside Lightning."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from ldm.config import apply_deprecated_keys, rename_deprecated_overrides
from ldm.train import train

FAST = ["debug=fast", "logger=csv", "data.batch_size=16"]

# The user's one file: an embedder for an integer "style" in the batch (a learned token per style).
STYLE_EMBEDDER = '''
import torch
from torch import nn

from ldm.nets.conditioners import Embedder


class StyleEmbedder(Embedder):
    output = "context"

    def __init__(self, num_styles: int, embed_dim: int, input_key: str = "style", drop_rate: float = 0.1):
        super().__init__(input_key, drop_rate)
        self.num_styles, self.output_dim = num_styles, embed_dim
        self.embedding = nn.Embedding(num_styles + 1, embed_dim)  # + the null style

    def encode(self, styles, drop):
        styles = torch.where(drop.to(styles.device), self.num_styles, torch.as_tensor(styles).long())
        return self.embedding(styles.to(self.embedding.weight.device))[:, None]  # (B, 1, D)

    def unconditional(self, batch_size, device=None):
        return self.encode(torch.zeros(batch_size, dtype=torch.long), torch.ones(batch_size, dtype=torch.bool))

    def example_inputs(self, request):
        return torch.arange(request.n) % self.num_styles
'''

# ...and its one yaml: class and style tokens side by side, dropped together for guidance.
STYLE_YAML = """
conditioner:
  _target_: ldm.nets.conditioners.Conditioner
  embedders:
    - _target_: ldm.nets.conditioners.ClassEmbedder
      num_classes: 10
      embed_dim: 32
      input_key: label
      drop_rate: 0.1
    - _target_: style_embedder.StyleEmbedder
      num_styles: 3
      embed_dim: 32
      drop_rate: 0.1
"""

# Test scaffolding, not part of the recipe: MNIST-5k digits whose examples also carry a style (index mod 3).
STYLED_DATA = '''
from torch.utils.data import Dataset

from ldm.data.base import split_key
from ldm.data.mnist5k import MNIST5kDataModule


class Styled(Dataset):
    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        return {**self.base[key], "style": split_key(key)[0] % 3}


class StyledMnist5k(MNIST5kDataModule):
    def setup(self, stage=None):
        super().setup(stage)
        if not isinstance(self.train_dataset, Styled):
            self.train_dataset, self.val_dataset = Styled(self.train_dataset), Styled(self.val_dataset)
'''


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory, compose_cfg):
    out = tmp_path_factory.mktemp("vae")
    train(compose_cfg(["stage=vae", *FAST], out))
    return out / "export"


def test_a_condition_with_a_new_batch_key_is_one_file_and_one_yaml(vae_export, compose_cfg, tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "conf" / "cond").mkdir(parents=True)
    (code / "style_embedder.py").write_text(STYLE_EMBEDDER)
    (code / "styled_data.py").write_text(STYLED_DATA)
    (code / "conf" / "cond" / "style.yaml").write_text(STYLE_YAML)
    monkeypatch.syspath_prepend(str(code))
    cfg = compose_cfg([f"hydra.searchpath=[file://{code / 'conf'}]", "stage=ldm", "cond=style", "model/ldm=unet_tiny",
                       f"first_stage.path={vae_export}", "data._target_=styled_data.StyledMnist5k",
                       "stage.final_samples.per_class=2", "stage.final_samples.judge=null", "sampler.steps=2",
                       *FAST], tmp_path / "run")
    results = train(cfg)
    assert results["train/steps"] > 0 and np.isfinite(results["train/loss"])
    # the final samples asked the new embedder for its example inputs: styles cycle within each class
    samples = np.load(results["samples"])
    assert samples["arr_0"].shape == (20, 32, 32, 1) and samples["labels"].tolist() == [c for c in range(10) for _ in (0, 1)]

    from ldm.io.load import load_ldm

    model, _ = load_ldm(tmp_path / "run" / "export")
    assert model.conditioner.batch_keys == ("label", "style")
    conditions = model.example_conditions(3)
    assert conditions["style"].tolist() == list(range(3)) * 10
    # the style reaches the backbone: same labels and noise, another style -> other images
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    one = model.sample({"label": torch.tensor([4, 4]), "style": torch.tensor([0, 0])}, 32, {"name": "ddim", "steps": 2},
                       generator=gen())
    other = model.sample({"label": torch.tensor([4, 4]), "style": torch.tensor([2, 2])}, 32,
                         {"name": "ddim", "steps": 2}, generator=gen())
    assert not torch.equal(one, other)


def test_data_without_the_key_a_condition_reads_is_named(vae_export, compose_cfg, tmp_path, monkeypatch):
    code = tmp_path / "code"
    (code / "conf" / "cond").mkdir(parents=True)
    (code / "style_embedder.py").write_text(STYLE_EMBEDDER)
    (code / "conf" / "cond" / "style.yaml").write_text(STYLE_YAML)
    monkeypatch.syspath_prepend(str(code))
    cfg = compose_cfg([f"hydra.searchpath=[file://{code / 'conf'}]", "stage=ldm", "cond=style", "model/ldm=unet_tiny",
                       f"first_stage.path={vae_export}", "stage.final_samples.enabled=false", *FAST], tmp_path / "run")
    with pytest.raises(Exception, match=r"reads batch keys \['style'\], but this data yields only"):
        train(cfg)


def test_the_deprecated_unet_key_still_builds_the_backbone(compose_cfg, tmp_path, vae_export):
    with pytest.warns(FutureWarning, match="model.ldm.unet is deprecated: write model.ldm.backbone"):
        renamed = rename_deprecated_overrides(["model.ldm.unet.model_channels=64", "seed=3", "~model.ldm.unet.dropout"])
    assert renamed == ["model.ldm.backbone.model_channels=64", "seed=3", "~model.ldm.backbone.dropout"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # today's spelling: no warning
        assert rename_deprecated_overrides(["model.ldm.backbone.model_channels=64"]) == ["model.ldm.backbone.model_channels=64"]

    # A user's model yaml of the old style: `unet:` with the channels wired through cond.* by hand.
    cfg = compose_cfg(["stage=ldm", "model/ldm=unet_tiny", f"first_stage.path={vae_export}", *renamed[:1]], tmp_path)
    with open_dict(cfg):
        old = OmegaConf.to_container(cfg.model.ldm.backbone)
        old.pop("_partial_")
        old.update(in_channels=3, out_channels=3, num_classes=None, adm_in_channels=None)
        old["transformer"]["context_dim"] = 256
        cfg.model.ldm.unet = old
        del cfg.model.ldm.backbone
    with pytest.warns(FutureWarning, match="model.ldm.unet is deprecated"):
        apply_deprecated_keys(cfg)
    model = instantiate(cfg.stage.module.model)
    assert model.backbone.model_channels == 64 and model.backbone.context_dim == 256


def test_a_run_config_from_before_the_model_layer_is_read_in_todays_layout():
    from ldm.io.load import upgrade_run_config

    old = OmegaConf.create({"stage": {"name": "ldm", "module": {
        "_target_": "ldm.lit.latent_diffusion.LatentDiffusionModule",
        "unet": {"_target_": "ldm.nets.unet.UNetModel", "in_channels": 3},
        "conditioner": {"_target_": "ldm.nets.conditioners.Conditioner", "embedders": []},
        "first_stage": {"_target_": "ldm.lit.first_stage.FirstStage.from_export", "path": "x"},
        "objective": {"_target_": "ldm.diffusion.objective.DiffusionObjective"},
        "lr": 1e-3}}})
    module = upgrade_run_config(old).stage.module
    assert set(module) == {"_target_", "model", "lr"}
    assert module.model._target_ == "ldm.model.LatentDiffusion" and module.model.backbone.in_channels == 3
    assert module.model.first_stage._target_ == "ldm.io.first_stage.from_export"
    assert module.model.conditioner.embedders == [] and module.model.objective._target_.endswith("DiffusionObjective")
    today = OmegaConf.create({"stage": {"name": "ldm", "module": {"model": {"backbone": {}}}}})
    assert upgrade_run_config(today) == today  # nothing to do
