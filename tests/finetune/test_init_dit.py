"""init=dit: stage 2 starts from a facebookresearch/DiT checkpoint (the released ``DiT-XL-2-256x256.pt``, a bare
state dict, or a train.py checkpoint ``{"model", "ema", "opt", "args"}``), written here in the official key layout
with random tensors. The loaded backbone computes what a reference written over the official key names with
functional ops computes; every mismatch with the run (architecture, first stage, labels, schedule) is one line
naming the override that fixes it."""

from __future__ import annotations

import argparse
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.config import instantiate_checked
from ldm.finetune.source import InitError
from ldm.finetune.wiring import configure
from ldm.io.compvis import UnsafeCheckpointError
from ldm.io.export import load_autoencoder, read_export
from ldm.io.load import backbone_config_of

TINY = {"depth": 2, "hidden": 64, "heads": 4, "patch": 2, "grid": 4}  # 8x8 latents: the tiny VAE on 32 px MNIST


def official_state(channels: int, classes: int = 10, depth: int = 2, hidden: int = 64, patch: int = 2, grid: int = 4,
                   learn_sigma: bool = True, seed: int = 0, expand: bool = False) -> dict[str, torch.Tensor]:
    """Tensors under facebookresearch/DiT's names (models.py), random. ``classes`` excludes the null row that
    DiT's LabelEmbedder appends for classifier-free guidance. expand: every tensor a stride-0 view of one number,
    so a full-size DiT-XL file takes a few kB (for the checks that read shapes only)."""
    g = torch.Generator().manual_seed(seed)
    out_channels = 2 * channels if learn_sigma else channels

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        if expand:
            return torch.full((1,), 0.01).expand(*shape)
        return torch.randn(*shape, generator=g) * scale

    state = {
        "x_embedder.proj.weight": rand(hidden, channels, patch, patch, scale=0.3), "x_embedder.proj.bias": rand(hidden),
        "pos_embed": rand(1, grid * grid, hidden, scale=0.5),  # random, not sin-cos: the file's own must be used
        "t_embedder.mlp.0.weight": rand(hidden, 256), "t_embedder.mlp.0.bias": rand(hidden),
        "t_embedder.mlp.2.weight": rand(hidden, hidden), "t_embedder.mlp.2.bias": rand(hidden),
        "y_embedder.embedding_table.weight": rand(classes + 1, hidden, scale=0.5),
        "final_layer.linear.weight": rand(patch * patch * out_channels, hidden),
        "final_layer.linear.bias": rand(patch * patch * out_channels),
        "final_layer.adaLN_modulation.1.weight": rand(2 * hidden, hidden), "final_layer.adaLN_modulation.1.bias": rand(2 * hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state |= {b + "attn.qkv.weight": rand(3 * hidden, hidden, scale=0.2), b + "attn.qkv.bias": rand(3 * hidden),
                  b + "attn.proj.weight": rand(hidden, hidden), b + "attn.proj.bias": rand(hidden),
                  b + "mlp.fc1.weight": rand(4 * hidden, hidden), b + "mlp.fc1.bias": rand(4 * hidden),
                  b + "mlp.fc2.weight": rand(hidden, 4 * hidden), b + "mlp.fc2.bias": rand(hidden),
                  b + "adaLN_modulation.1.weight": rand(6 * hidden, hidden, scale=0.3),
                  b + "adaLN_modulation.1.bias": rand(6 * hidden)}
    return state


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      heads: int) -> torch.Tensor:
    """Official DiT's forward (models.py, with timm's Attention and Mlp) spelt out over the official names."""
    def linear(h, name):
        return F.linear(h, sd[name + ".weight"], sd[name + ".bias"])

    def modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    p = sd["x_embedder.proj.weight"].shape[-1]
    n, _, height, width = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]  # (N, T, D)
    dim = h.shape[-1]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t.float()[:, None] * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = c + sd["y_embedder.embedding_table.weight"][y]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b = f"blocks.{i}."
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        a = modulate(norm(h), shift_msa, scale_msa)
        qkv = linear(a, b + "attn.qkv").reshape(n, -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = linear((attn @ v).transpose(1, 2).reshape(n, -1, dim), b + "attn.proj")
        h = h + gate_msa.unsqueeze(1) * a
        m = modulate(norm(h), shift_mlp, scale_mlp)
        m = linear(F.gelu(linear(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m
    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    out = linear(modulate(norm(h), shift, scale), "final_layer.linear")  # (N, T, p*p*C)
    c_out = out.shape[-1] // (p * p)
    out = out.reshape(n, height // p, width // p, p, p, c_out)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(n, c_out, height, width)


@pytest.fixture(scope="module")
def latent_channels(tiny_vae_export) -> int:
    return int(load_autoencoder(tiny_vae_export)[1]["latent_channels"])


def run_overrides(vae, path, *extra: str) -> list[str]:
    """A tiny DiT run class-conditioned through adaLN (as official DiT) on the tiny VAE's 8x8 latents."""
    return ["stage=ldm", f"first_stage.path={vae}", "model/ldm=dit_tiny", "model.ldm.backbone.depth=2",
            "model.ldm.backbone.hidden_size=64", "model.ldm.backbone.learn_sigma=true", "cond=class_vector",
            "cond.num_classes=10", "schedule=linear", "objective=eps", "init=dit", f"init.path={path}", *extra]


def build(compose_cfg, overrides, tmp_path):
    cfg = compose_cfg(overrides, tmp_path)
    configure(cfg, tmp_path)
    return cfg, instantiate_checked(cfg.stage.module, "stage.module")  # as ldm-train builds it


def test_the_loaded_dit_computes_the_official_forward(tiny_vae_export, latent_channels, compose_cfg, tmp_path):
    state = official_state(latent_channels)
    torch.save(state, tmp_path / "DiT-tiny.pt")
    _, module = build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "DiT-tiny.pt"), tmp_path / "run")
    net = module.model.backbone
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, latent_channels, 8, 8, generator=g)
    t = torch.tensor([0.0, 417.0, 999.0])
    y = torch.tensor([0, 7, 10])  # 10: the null class, the table's last row
    with torch.no_grad():
        ours = net(x, t, y=y)
    reference = reference_forward(state, x, t, y, TINY["heads"])
    assert ours.shape == (3, 2 * latent_channels, 8, 8)  # learn_sigma: mean and variance halves
    assert reference.abs().mean() > 0.1
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_ldm_train_starts_from_an_official_file(tiny_vae_export, latent_channels, monkeypatch, capsys, tmp_path):
    from ldm import train as train_cli

    state = official_state(latent_channels, seed=3)
    torch.save(state, tmp_path / "DiT-tiny.pt")
    argv = [*run_overrides(tiny_vae_export, tmp_path / "DiT-tiny.pt"), "debug=fast", "stage.max_steps=2",
            "stage.final_samples.enabled=false", "stage.module.preview.every_n_steps=0", "data.batch_size=4",
            "run_name=dit", f"paths.root_dir={tmp_path}", "logger=csv"]
    monkeypatch.setattr(sys, "argv", ["ldm-train", *argv])  # ldm-train as the console script runs it
    try:
        train_cli.main()
    except SystemExit as stop:
        pytest.fail(f"ldm-train exited with {stop.code}: {capsys.readouterr().err[-2000:]}")
    run = tmp_path / "outputs" / "ldm" / "dit"
    rows = [line.split("\t") for line in (run / "init_report.tsv").read_text().splitlines()[1:]]
    assert {r[0] for r in rows} == set(state) and {r[2] for r in rows} == {"backbone"}
    tensors, config, _ = read_export(run / "export", kind="ldm")
    # the file's own positions (a buffer: training leaves it) reached the exported model
    assert torch.equal(tensors["model.diffusion_model.pos_embed"], state["pos_embed"])
    assert backbone_config_of(config).learn_sigma and backbone_config_of(config).input_size == 8


def test_a_train_py_checkpoint_loads_its_ema_copy(tiny_vae_export, latent_channels, compose_cfg, tmp_path, caplog):
    online, ema = official_state(latent_channels, seed=4), official_state(latent_channels, seed=5)
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    args = argparse.Namespace(model="DiT-XL/2", image_size=64, num_classes=10, vae="ema", epochs=1400)
    torch.save({"model": online, "ema": ema, "opt": opt, "args": args}, tmp_path / "0010000.pt")
    with caplog.at_level("INFO", logger="ldm.finetune"):
        _, module = build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "0010000.pt"), tmp_path / "a")
    assert torch.equal(module.model.backbone.blocks[1].mlp.fc2.weight, ema["blocks.1.mlp.fc2.weight"])
    assert "'ema' weights of a train.py checkpoint" in caplog.text and "DiT-XL/2" in caplog.text
    rows = [line.split("\t") for line in (tmp_path / "a" / "init_report.tsv").read_text().splitlines()[1:]]
    where = {key: destination for key, _, destination in rows}
    assert all(where[f"ema.{k}"] == "backbone" for k in ema) and len(where) == 2 * len(ema) + 2
    assert where["model.pos_embed"].startswith("skipped: the other copy") and where["opt.state.0.exp_avg"].startswith("skipped: optimizer")
    _, module = build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "0010000.pt", "init.use_ema=false"),
                      tmp_path / "b")
    assert torch.equal(module.model.backbone.blocks[1].mlp.fc2.weight, online["blocks.1.mlp.fc2.weight"])


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_with_other_python_objects_is_never_unpickled(tiny_vae_export, latent_channels, compose_cfg,
                                                                    tmp_path):
    torch.save({"ema": official_state(latent_channels), "args": Payload()}, tmp_path / "bad.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "bad.pt"), tmp_path / "run")


def preset_file(tmp_path, name, channels, depth, hidden, patch=2, grid=16, classes=1000):
    path = tmp_path / f"{name}.pt"
    torch.save(official_state(channels, classes, depth, hidden, patch, grid, expand=True), path)
    return path


@pytest.mark.parametrize(("configured", "depth", "hidden", "found", "fix"), [
    ("unet_tiny", 12, 384, "DiT-S/2", "model/ldm=dit_s2"),
    ("dit_b2", 28, 1152, "DiT-XL/2", "model/ldm=dit_xl2"),
    ("dit_s2", 24, 1024, "DiT-L/2", "model/ldm=dit_l2"),
])
def test_another_architecture_names_the_preset_and_its_config(tiny_vae_export, latent_channels, compose_cfg, tmp_path,
                                                              configured, depth, hidden, found, fix):
    path = preset_file(tmp_path, found.replace("/", "-"), latent_channels, depth, hidden)
    overrides = [o for o in run_overrides(tiny_vae_export, path, "cond.num_classes=1000") if not o.startswith("model")]
    with pytest.raises(InitError, match=rf"{found}.*{fix}") as err:
        build(compose_cfg, [*overrides, f"model/ldm={configured}"], tmp_path / "run")
    assert "\n" not in str(err.value)


def test_the_preset_configs_are_the_official_sizes(compose_cfg, tmp_path):
    from ldm.finetune.official_dit import PRESETS

    for (depth, hidden), (name, heads) in PRESETS.items():
        backbone = compose_cfg(["stage=ldm", f"model/ldm=dit_{name.lower()}2"], tmp_path).model.ldm.backbone
        assert (backbone.depth, backbone.hidden_size, backbone.num_heads, backbone.patch_size) == (depth, hidden, heads, 2)
        assert backbone.input_size == 32 and not backbone.learn_sigma  # 256 px through an f=8 VAE


@pytest.mark.parametrize(("change", "message"), [
    (["model.ldm.backbone.learn_sigma=false"], "learn_sigma.*model.ldm.backbone.learn_sigma=true"),
    (["model.ldm.backbone.input_size=16"], "model.ldm.backbone.input_size=8"),
    (["cond.num_classes=1000"], "10 classes.*cond.num_classes=10"),
    (["cond=class"], "cond=class_vector"),
    (["schedule=scaled_linear"], "linear betas 1e-4..0.02 over 1000 steps.*schedule=linear"),
    (["schedule.num_train_timesteps=500"], "schedule=linear"),
    (["objective=v"], "eps.*objective=eps"),
    (["init.first_stage=true"], "init.first_stage=false"),
])
def test_each_mismatch_with_the_run_is_one_line_naming_the_fix(tiny_vae_export, latent_channels, compose_cfg, tmp_path,
                                                               change, message):
    torch.save(official_state(latent_channels), tmp_path / "DiT-tiny.pt")
    with pytest.raises(InitError, match=message) as err:
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "DiT-tiny.pt", *change), tmp_path / "run")
    assert "\n" not in str(err.value)


def test_a_latent_channel_mismatch_names_the_first_stage(tiny_vae_export, latent_channels, compose_cfg, tmp_path):
    torch.save(official_state(latent_channels + 1), tmp_path / "DiT-tiny.pt")
    with pytest.raises(InitError, match=rf"{latent_channels + 1} latent channels.*first stage.*{latent_channels}"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "DiT-tiny.pt"), tmp_path / "run")


def test_derive_config_takes_the_preset_of_the_file(tiny_vae_export, latent_channels, compose_cfg, tmp_path):
    path = preset_file(tmp_path, "DiT-S-4", latent_channels, 12, 384, patch=4, grid=2)
    cfg = compose_cfg([*run_overrides(tiny_vae_export, path, "cond.num_classes=1000", "init.derive_config=true")],
                      tmp_path)
    configure(cfg, tmp_path)
    node = OmegaConf.to_container(cfg.model.ldm.backbone, resolve=True)
    assert node["_target_"] == "ldm.nets.dit.DiT" and node["_partial_"]
    assert {k: node[k] for k in ("depth", "hidden_size", "num_heads", "patch_size", "input_size", "learn_sigma")} == {
        "depth": 12, "hidden_size": 384, "num_heads": 6, "patch_size": 4, "input_size": 8, "learn_sigma": True}
    tiny = preset_file(tmp_path, "odd", latent_channels, 2, 64, grid=4, classes=10)
    with pytest.raises(InitError, match="no official preset.*init.derive_config=false"):
        configure(compose_cfg(run_overrides(tiny_vae_export, tiny, "init.derive_config=true"), tmp_path / "b"),
                  tmp_path / "b")


def test_a_file_of_another_layout_names_its_format(tiny_vae_export, latent_channels, compose_cfg, tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "sd.safetensors")
    with pytest.raises(InitError, match="CompVis.*init=compvis"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "sd.safetensors"), tmp_path / "a")
    ours = {f"model.diffusion_model.{k}": v for k, v in official_state(latent_channels).items()}
    save_file(ours, tmp_path / "model.safetensors")  # an ldm export's layout of the same DiT
    with pytest.raises(InitError, match="an ldm DiT under model.diffusion_model"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "model.safetensors"), tmp_path / "d")
    with pytest.raises(InitError, match="is a folder, but init=dit reads one single file"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path), tmp_path / "e")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(InitError, match="neither an official DiT checkpoint"):
        build(compose_cfg, run_overrides(tiny_vae_export, tmp_path / "other.pt"), tmp_path / "b")
    torch.save(official_state(latent_channels), tmp_path / "DiT-tiny.pt")
    compvis = ["init=compvis", f"init.path={tmp_path / 'DiT-tiny.pt'}", "init.prediction=eps"]
    with pytest.raises(InitError, match="official DiT checkpoint.*init=dit"):
        build(compose_cfg, [o for o in run_overrides(tiny_vae_export, "x") if not o.startswith("init")] + compvis,
              tmp_path / "c")


def test_the_readme_command_for_dit_xl_2_passes_the_checks(compose_cfg, tmp_path):
    """The README's command (the DiT-B/2 ImageNet recipe switched to the released DiT-XL/2 256 file) is what the
    file needs: the checks of configure() pass, and the recipe alone is refused naming the two overrides."""
    path = preset_file(tmp_path, "DiT-XL-2-256x256", 4, 28, 1152)
    recipe = ["experiment=dit_b2_imagenet256", "data.root=/data/imagenet/train", "first_stage.path=/models/sd-vae-ft-ema",
              "init=dit", f"init.path={path}"]
    cfg = compose_cfg([*recipe, "model/ldm=dit_xl2", "model.ldm.backbone.learn_sigma=true"], tmp_path)
    configure(cfg, tmp_path)
    assert cfg.model.ldm.backbone.depth == 28 and cfg.cond.num_classes == 1000 and cfg.schedule.kind == "linear"
    with pytest.raises(InitError, match="DiT-XL/2.*add model/ldm=dit_xl2 model.ldm.backbone.learn_sigma=true"):
        configure(compose_cfg(recipe, tmp_path / "b"), tmp_path / "b")
