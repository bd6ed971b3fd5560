"""diffusers as a client of a LoRA run with a fine-tuned text encoder (issue 24, items 2, 3, 8): a tiny SD-shaped
pipeline folder -> ``ldm-train init=diffusers finetune=lora finetune.train_text_encoder=true`` ->
``ldm-export --lora`` loaded with ``pipe.load_lora_weights`` and ``ldm-export --merge --diffusers`` loaded with
``StableDiffusionPipeline.from_pretrained(folder)`` alone: both give the same prompt embeddings and UNet outputs
as each other and as our merged model, and both draw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_sd import diffusers_init, stage2

from ldm.export_cli import main as export_main
from ldm.finetune.adapters import DIFFUSERS_LORA_WEIGHTS
from ldm.io.load import load_ldm_export
from ldm.train import train

diffusers = pytest.importorskip("diffusers")
# lr 0.05 without warm-up: four steps move the adapters far enough that a dropped text-encoder update would show
LORA = ["finetune=lora", "finetune.lora.rank=2", "finetune.lora.alpha=4", "model.ldm.lr=0.05",
        "optim.scheduler.warmup_steps=1", "finetune.train_text_encoder=true"]
PROMPT = ["a red square 3", "b2"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def client(tiny, compose_cfg, tmp_path_factory) -> dict[str, Path]:
    run = tmp_path_factory.mktemp("client_run")
    train(compose_cfg(stage2(tiny, *diffusers_init(tiny), *LORA), run))
    out = tmp_path_factory.mktemp("client_out")
    assert export_main([str(run / "export"), "--lora", str(out / "lora")]) == 0
    assert export_main([str(run / "export"), "--merge", "--diffusers", str(out / "merged"),
                        "--compvis", str(out / "merged.safetensors")]) == 0
    return {"run": run, "lora": out / "lora", "merged": out / "merged", "compvis": out / "merged.safetensors"}


def pipelines(tiny: Path, client: dict[str, Path]):
    from diffusers import StableDiffusionPipeline

    merged = StableDiffusionPipeline.from_pretrained(str(client["merged"]))  # the folder alone
    base = StableDiffusionPipeline.from_pretrained(str(tiny / "diffusers"))
    lora = StableDiffusionPipeline.from_pretrained(str(tiny / "diffusers"))
    lora.load_lora_weights(str(client["lora"]), weight_name=DIFFUSERS_LORA_WEIGHTS)
    lora.scheduler = merged.scheduler  # the same sampler, so that the drawn images can be compared too
    return base, lora, merged


def test_lora_and_merged_pipelines_give_the_same_embeddings_unet_outputs_and_images(tiny, client):
    base, lora, merged = pipelines(tiny, client)
    with torch.no_grad():
        embeds = {name: pipe.encode_prompt(PROMPT, "cpu", 1, False)[0] for name, pipe in
                  (("base", base), ("lora", lora), ("merged", merged))}
        ours, _ = load_ldm_export(client["run"] / "export")
        ours_embeds = ours.conditioner.embedders[0].encode(PROMPT, torch.zeros(2, dtype=torch.bool))
        assert rel(embeds["lora"], embeds["base"]) > 1e-2  # the text-encoder adapters matter
        assert rel(embeds["lora"], embeds["merged"]) < 1e-3
        assert rel(ours_embeds, embeds["merged"]) < 1e-3
        gen = torch.Generator().manual_seed(3)
        x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([20, 800])
        ctx = embeds["merged"]
        out = {name: pipe.unet(x, t, encoder_hidden_states=ctx).sample for name, pipe in
               (("base", base), ("lora", lora), ("merged", merged))}
        assert rel(out["lora"], out["base"]) > 1e-2
        assert rel(out["lora"], out["merged"]) < 1e-3
        assert rel(ours.backbone(x, t, context=ctx), out["merged"]) < 1e-3
        images = [pipe(PROMPT[:1], height=32, width=32, num_inference_steps=3, guidance_scale=2.0, output_type="np",
                       generator=torch.Generator().manual_seed(0)).images for pipe in (lora, merged)]
    for image in images:
        assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())
    assert float(abs(images[0] - images[1]).max()) < 1e-3


def test_merged_folder_is_a_complete_pipeline_that_names_no_base_encoder(tiny, client):
    index = json.loads((client["merged"] / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][0] == "transformers" and "CLIPTokenizer" in index["tokenizer"][1]
    reference = json.loads((client["merged"] / "conditioner.json").read_text())
    text = json.dumps(reference)
    assert str(tiny) not in text and str(client["run"]) not in text  # neither the base nor the run's cache
    assert reference["text_encoders"][0]["pretrained"] == "text_encoder"


def test_lora_file_uses_the_transformers4_layout_of_sd_pipelines(client):
    keys = load_file(str(client["lora"] / DIFFUSERS_LORA_WEIGHTS)).keys()
    text = sorted(k for k in keys if k.startswith("text_encoder."))
    assert text and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text), text[:3]
    assert any(k.endswith("self_attn.q_proj.lora_A.weight") for k in text)


def test_merged_compvis_file_carries_the_fine_tuned_clip_tower(tiny, client):
    from transformers import CLIPTextModel

    tensors = load_file(str(client["compvis"]))
    tower = {k.removeprefix("cond_stage_model.transformer."): v for k, v in tensors.items()
             if k.startswith("cond_stage_model.transformer.")}
    assert tower and all(k.startswith("text_model.") for k in tower)
    assert not any(k.startswith("cond_stage_model.embedders.") for k in tensors)
    merged = CLIPTextModel.from_pretrained(str(client["merged"] / "text_encoder"))
    base = CLIPTextModel.from_pretrained(str(tiny / "diffusers" / "text_encoder"))
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        want = merged(ids).last_hidden_state
        assert rel(base(ids).last_hidden_state, want) > 1e-3  # the file's tower is the fine-tuned one
        base.load_state_dict({k.removeprefix("text_model.") if not hasattr(base, "text_model") else k: v
                              for k, v in tower.items()}, strict=True)
        torch.testing.assert_close(base(ids).last_hidden_state, want, rtol=1e-5, atol=1e-6)
