"""The Conditioner: every embedder of a model, their joint dropout, and what the backbone must consume."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.nets.backbone import ConditionSpec
from ldm.nets.conditioners.base import Embedder, ExampleRequest, _bernoulli

OUTPUT_KINDS = ("context", "y", "vector", "concat")


class Conditioner(nn.Module):
    """Runs every embedder on a batch and gathers what the backbone needs:
    {'context': (B, L, D) or None, 'y': labels (B,) or a vector (B, D) or None, 'concat': (B, C, h, w) or None}.
    Several context outputs are joined along L, several vector outputs (SDXL: pooled text + size embeddings)
    along D, several concat outputs along C.

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
        unknown = [type(e).__name__ for e in self.embedders if getattr(e, "output", None) not in OUTPUT_KINDS]
        if unknown:
            raise ValueError(f"Embedders {unknown} declare no output kind; set `output` to one of {OUTPUT_KINDS}.")
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
        self.spec = self._spec()
        class_embedders = [e for e in self.embedders if getattr(e, "num_classes", None)]
        if len({e.num_classes for e in class_embedders}) > 1:
            raise ValueError(f"Class embedders disagree on num_classes: {[e.num_classes for e in class_embedders]}.")
        # dataset classes (labels 0..num_classes-1), or None without a class embedder
        self.num_classes: int | None = class_embedders[0].num_classes if class_embedders else None
        self.input_keys: tuple[str, ...] = tuple(e.input_key for e in self.embedders)
        self.batch_keys: tuple[str, ...] = tuple(dict.fromkeys(k for e in self.embedders for k in e.batch_keys))
        self.needs_images = any(e.needs_images for e in self.embedders)
        self.takes_prompts = any(e.takes_prompts for e in self.embedders)

    def _spec(self) -> ConditionSpec:
        by_kind = {kind: [e for e in self.embedders if e.output == kind] for kind in OUTPUT_KINDS}
        dims = {e.output_dim for e in by_kind["context"]}
        if len(dims) > 1:
            raise ValueError(f"Context embedders output different widths {sorted(dims)}; their tokens are "
                             "concatenated, so give them one embed_dim.")
        if len(by_kind["y"]) > 1 or (by_kind["y"] and by_kind["vector"]):
            raise ValueError("At most one embedder may give the backbone labels `y`, and not beside a vector `y`.")
        return ConditionSpec(
            context_dim=dims.pop() if dims else None,
            # entries the backbone's label embedding must hold (classes + null) when labels go to it as `y`
            num_classes=by_kind["y"][0].label_count if by_kind["y"] else None,
            vector_dim=sum(e.output_dim for e in by_kind["vector"]) or None,
            concat_channels=sum(e.channels for e in by_kind["concat"]),
        )

    def prepare(self, batch: dict[str, Any], first_stage: nn.Module, generator: torch.Generator | None = None):
        """Each embedder's preparation step (inpainting masks and encodes the images here)."""
        for e in self.embedders:
            batch = e.prepare(batch, first_stage, generator)
        return batch

    def forward(
        self, batch: Mapping[str, Any], force_unconditional: bool = False, generator: torch.Generator | None = None,
        allow_missing: bool = False, spatial_size: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor | None]:
        """allow_missing (sampling): an embedder whose key the batch lacks runs unconditionally, e.g. the caption
        of a class+text model sampled from labels alone; in training a missing key is an error."""
        present = [e for e in self.embedders if not allow_missing or e.input_key in batch]
        joint = self._joint_drop(batch, present, generator) if self.training and not force_unconditional else None
        batch_size = _batch_size(batch)
        outputs = []
        for e in self.embedders:
            if e not in present:
                outputs.append((e.output, self._unconditional_of(e, batch_size, spatial_size, self._device(batch))))
                continue
            drop = None
            if joint is not None and e.guided:
                drop = joint
                if self.independent_drops:
                    drop = joint | e.drop_mask(len(joint), generator).to(joint.device)
            outputs.append((e.output, e(batch, force_unconditional, generator, drop=drop)))
        return self._gather(outputs)

    def _joint_drop(self, batch, embedders, generator: torch.Generator | None) -> torch.Tensor | None:
        """(B,) bool: samples whose guided conditions are all dropped; None without guided embedders."""
        keys = [e.input_key for e in embedders if e.guided and e.input_key in batch]
        if not keys:
            return None  # no guided embedder, or a missing key the embedder itself reports
        batch_size = len(batch[keys[0]])
        if self.joint_drop_rate == 0.0:
            return torch.zeros(batch_size, dtype=torch.bool)
        return _bernoulli(batch_size, self.joint_drop_rate, generator)

    def unconditional(
        self, batch_size: int, device: torch.device | str | None = None, spatial_size: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor | None]:
        return self._gather([(e.output, self._unconditional_of(e, batch_size, spatial_size, device))
                             for e in self.embedders])

    def _unconditional_of(self, e: Embedder, batch_size: int, spatial_size, device=None) -> torch.Tensor:
        extra = {"spatial_size": spatial_size} if e.output == "concat" else {}
        if device is None:
            device = self._device({})
        return e.unconditional(batch_size, device=device, **extra)

    def _device(self, batch: Mapping[str, Any]) -> torch.device:
        """Where an embedder's unconditional output is made: with the conditioner's weights, else with the batch's
        tensors. A parameter-less embedder (labels passed on as ``y``) has no device of its own: beside a text
        encoder on the GPU, sampled from prompts alone, its null labels must go to the GPU too."""
        for tensor in itertools.chain(self.parameters(), self.buffers()):
            return tensor.device
        for value in batch.values():
            if torch.is_tensor(value):
                return value.device
        return torch.device("cpu")

    def example_conditions(
        self, per_group: int, labels: Sequence[int] | torch.Tensor | None = None, prompts: Sequence[str] | None = None,
        caption_for: Callable[[int], str] | None = None,
    ) -> dict[str, Any]:
        """Conditions for ``per_group`` samples of each group, group-major: the given prompts, else the given
        labels, else every class of the model; with none of them, one unconditional group.

        The result maps batch keys to inputs (those an embedder cannot make are left out, so that embedder runs
        unconditionally) and keeps ``label`` whenever the set is organised by class, so a judge can check it.
        """
        if prompts:
            prompts = [str(p) for p in prompts for _ in range(per_group)]
        if labels is None and self.num_classes and not prompts:
            labels = range(self.num_classes)
        if labels is not None:
            labels = torch.as_tensor(list(labels), dtype=torch.long).repeat_interleave(per_group)
        if prompts and labels is not None and len(prompts) != len(labels):
            raise ValueError(f"{len(prompts) // per_group} prompts and {len(labels) // per_group} labels: give as many "
                             "of each (one prompt per label), or only one of them")
        n = len(prompts) if prompts else len(labels) if labels is not None else per_group
        request = ExampleRequest(n, labels, prompts or None, caption_for)
        conditions: dict[str, Any] = {} if labels is None else {"label": labels}
        for e in self.embedders:
            value = e.example_inputs(request)
            if value is not None:
                conditions[e.input_key] = value
        if not conditions:
            conditions["n"] = [None] * n  # no inputs: the whole set is unconditional
        return conditions

    @staticmethod
    def _gather(outputs: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
        def joined(kind: str, dim: int) -> torch.Tensor | None:
            parts = [t for k, t in outputs if k == kind]
            return torch.cat(parts, dim=dim) if parts else None

        labels = [t for kind, t in outputs if kind == "y"]
        return {
            "context": joined("context", 1),
            "y": labels[0] if labels else joined("vector", 1),
            "concat": joined("concat", 1),
        }


def _batch_size(batch: Mapping[str, Any]) -> int | None:
    for value in batch.values():
        if value is not None and not isinstance(value, (int, float, str)):
            return len(value)
    return None
