"""finetune=lora (peft) on the tiny SD-shaped model: only LoRA tensors train, sit in the optimizer and the EMA;
checkpoints hold only them (+ the base's reference) and resume bit for bit; the export's adapters load in
diffusers and give our merged model's outputs; a freeze list under finetune=full; errors name the fix."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from tiny_sd import compvis, diffusers_init, stage2
from torch.utils.data import DataLoader

from ldm.export_cli import main as export_main
from ldm.finetune.adapters import DIFFUSERS_LORA_WEIGHTS, read_adapter
from ldm.finetune.lora import LoraSpec, apply_lora, merge_lora_state
from ldm.finetune.wiring import configure
from ldm.io.load import load_ldm, load_ldm_export
from ldm.train import train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_reliability import assert_same_training_state, load  # noqa: E402

diffusers = pytest.importorskip("diffusers")
# lr 0.05 without warm-up: four steps move the adapters far enough that a wrong export would show
LORA = ["finetune=lora", "finetune.lora.rank=2", "finetune.lora.alpha=4", "model.ldm.lr=0.05",
        "optim.scheduler.warmup_steps=1", "finetune.train_text_encoder=true"]


def batch() -> dict:
    return {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
            "caption": ["a red square 1", "b2"]}


def test_a_lora_step_changes_only_lora_tensors(tiny, compose_cfg, tmp_path):
    cfg = compose_cfg(stage2(tiny, *compvis(tiny), *LORA), tmp_path)
    configure(cfg, tmp_path)
    module = instantiate(cfg.stage.module)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([batch()] * 3, batch_size=None))
    after = module.state_dict()
    lora = {k for k in before if ".lora_" in k}
    assert lora and all(".lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the base (UNet, EMA base, VAE, text encoder) is bitwise intact
    assert changed - lora == {"ema.num_updates", "ema_conditioner.num_updates"}
    assert any("model.backbone." in k and "lora_B" in k for k in changed) and any("conditioner." in k for k in changed)
    assert any(k.startswith("ema.model.") and "lora_B" in k for k in changed)  # EMA over the LoRA parameters
    assert any(k.startswith("ema_conditioner.model.") and "lora_B" in k for k in changed)  # text encoder's too
    sampler = module.sampler()  # validation, previews and exports: EMA UNet with EMA text encoder
    assert sampler.backbone is module.ema.model and sampler.conditioner is module.ema_conditioner.model
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}
    # the EMA copy shares the frozen base instead of holding a second one
    name = next(n for n, _ in module.model.backbone.named_parameters() if n.endswith("to_q.base_layer.weight"))
    assert module.ema.model.get_parameter(name) is module.model.backbone.get_parameter(name)


@pytest.fixture(scope="module")
def lora_run(tiny, compose_cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_straight")
    train(compose_cfg(stage2(tiny, *compvis(tiny), *LORA), out))
    return out


def test_checkpoint_holds_only_trainable_state_and_resumes_bit_for_bit(lora_run, tiny, compose_cfg, tmp_path):
    ckpt = load(lora_run / "checkpoints" / "last.ckpt")
    assert all(".lora_" in k for k in ckpt["state_dict"] if not k.endswith("num_updates"))
    assert ckpt["finetune_base"] == {"init": {"format": "compvis", "path": str(tiny / "sd.safetensors")}, "finetune": "lora"}
    assert any(".base_layer." in k for k in ckpt["frozen_state_omitted"])
    overrides = stage2(tiny, *compvis(tiny), *LORA)
    train(compose_cfg([*overrides, "trainer.max_steps=2"], tmp_path))
    train(compose_cfg([*overrides, "ckpt_path=last"], tmp_path))
    assert_same_training_state(lora_run / "checkpoints" / "last.ckpt", tmp_path / "checkpoints" / "last.ckpt")


def test_export_adapters_load_in_diffusers_with_our_merged_outputs(lora_run, tiny, tmp_path):
    out = tmp_path / "lora"
    assert export_main([str(lora_run / "export"), "--lora", str(out)]) == 0
    sampler, _ = load_ldm_export(lora_run / "export")  # the merged model, loaded strictly like any export
    unet = diffusers.UNet2DConditionModel.from_pretrained(tiny / "diffusers" / "unet").eval()
    gen = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 5, 64, generator=gen)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=ctx).sample
        unet.load_lora_adapter(str(out), weight_name=DIFFUSERS_LORA_WEIGHTS, prefix="unet")
        theirs = unet(x, t, encoder_hidden_states=ctx).sample
        ours = sampler.backbone(x, t, context=ctx)
    assert (theirs - base).norm() > 0.05 * base.norm()  # the adapters matter, so the comparison can fail
    assert ((ours - theirs).norm() / theirs.norm()) < 1e-4
    # ldm-sample / ldm-evaluate on the run's .ckpt: the base rebuilt from init, the adapters from the checkpoint
    from_ckpt, _ = load_ldm(lora_run / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        torch.testing.assert_close(from_ckpt.backbone(x, t, context=ctx), ours, rtol=1e-4, atol=1e-5)
    # --merge is needed to write the merged model in the ecosystem's formats
    assert export_main([str(lora_run / "export"), "--diffusers", str(tmp_path / "d")]) == 2
    assert export_main([str(lora_run / "export"), "--merge", "--compvis", str(tmp_path / "m.safetensors")]) == 0


def test_text_encoder_adapters_are_merged_into_the_export(lora_run):
    sampler, info = load_ldm_export(lora_run / "export")
    (encoder,) = sampler.conditioner.embedders
    from transformers import CLIPTextModel

    base = CLIPTextModel.from_pretrained(encoder_path := info["config"]["conditioner"]["embedders"][0]["pretrained"])
    assert Path(encoder_path).is_dir()
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, encoder.transformer.state_dict()[k])]
    assert moved and all("_proj" in k for k in moved)


def test_text_encoder_adapters_are_averaged_like_the_unet_and_exported_averaged(lora_run):
    """Issue 24 item 3: the EMA UNet is paired with EMA text-encoder adapters in validation, previews and exports."""
    state = load(lora_run / "checkpoints" / "last.ckpt")["state_dict"]
    live = {k.removeprefix("model.conditioner."): v for k, v in state.items() if k.startswith("model.conditioner.")}
    ema = {k.removeprefix("ema_conditioner.model."): v for k, v in state.items() if k.startswith("ema_conditioner.model.")}
    assert live and ema.keys() == live.keys() and all(".lora_" in k for k in live)
    assert any(not torch.equal(ema[k], live[k]) for k in live)  # averaged, not copied
    adapters, info = read_adapter(lora_run / "export")
    text = {k: v for k, v in adapters.items() if k.startswith("text_encoder.")}
    assert text and info["ema"] == {"unet": True, "text_encoder": True}
    for key, value in text.items():  # text_encoder.<module>.lora_A.weight <- <module>.lora_A.default.weight
        module, _, leaf = key.removeprefix("text_encoder.").rpartition(".lora_")
        assert torch.equal(value, ema[f"{module}.lora_{leaf[0]}.default.weight"]), key


def test_merge_equals_peft_forward_and_unknown_targets_are_named():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 5))
    plain = {k: v.clone() for k, v in layer.state_dict().items()}
    spec = LoraSpec(rank=2, alpha=3.0, target_modules=["0"])
    apply_lora(layer, spec)
    with torch.no_grad():
        layer[0].lora_B["default"].weight.normal_()
    merged = merge_lora_state(layer.state_dict(), spec.scale)
    reference = torch.nn.Sequential(torch.nn.Linear(6, 5))
    reference.load_state_dict(merged)
    x = torch.randn(3, 6)
    torch.testing.assert_close(reference(x), layer(x), rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged["0.weight"], plain["0.weight"])
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no layer of the backbone; .*named e.g. \["):
        apply_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraSpec(target_modules=["to_qq"]))


def test_lora_target_that_does_not_exist_fails_before_training(tiny, compose_cfg, tmp_path):
    with pytest.raises(ValueError, match=r"\['attn_q'\] match no layer of the backbone.*to_q"):
        train(compose_cfg(stage2(tiny, *diffusers_init(tiny), "finetune=lora", "finetune.lora.target_modules=[attn_q]"),
                          tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_freeze_list_trains_only_the_attention_blocks(tiny, compose_cfg, tmp_path):
    results = train(compose_cfg(stage2(tiny, *diffusers_init(tiny), "finetune.trainable=[*transformer_blocks*]"),
                                tmp_path))
    assert math.isfinite(results["train/loss"])
    state = load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    kept = [k for k in state if k.startswith("model.backbone.")]
    assert kept and all("transformer_blocks" in k for k in kept)
    with pytest.raises(ValueError, match=r"finetune.trainable pattern\(s\) \['\*nothing\*'\] match no parameter"):
        train(compose_cfg(stage2(tiny, *diffusers_init(tiny), "finetune.trainable=[*nothing*]"), tmp_path / "x"))
