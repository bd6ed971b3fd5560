"""Sample-quality metrics during stage-2 training: a fixed, seeded sample set measured every N steps.

The same measurement as ``ldm-evaluate`` (:class:`ldm.metrics.suite.SampleMetrics`: same reference keys, cache
files and feature extractors), so a training curve's last point and an offline evaluation of the export
agree when drawn with the same sampler, guidance scale, seed and count.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)
_LOGGED_SUFFIXES = ("_n", "_ref_n", "_std", "_precision", "_recall")


def _features_for(reference: str) -> str:
    # The digit judge knows MNIST only; any other reference is compared in Inception's feature space.
    return "judge" if reference == "mnist5k" else "inception"


class SampleMetricsCallback(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, and once when training ends, samples ``per_class`` images of
    each class (or ``per_class`` in all for an unconditional model) with the EMA weights and a fixed seed,
    measures ``metrics`` against the reference data, and logs ``val/<metric>`` with ``val/<metric>_n``.

    Under data parallelism every rank draws a share of the set (the same images as one process would draw),
    takes its features batch by batch, and rank 0 measures the gathered features; the scalars are broadcast,
    so every rank holds identical ``trainer.callback_metrics``
    (checkpoint monitors then agree across ranks) and no collective runs on a subset of ranks.
    Values go to every logger via ``log_metrics`` at the current step: unlike ``pl_module.log`` in a
    training hook, that neither waits for ``log_every_n_steps`` nor is refused in ``on_train_end``.

    Args:
        every_n_steps: measure when ``global_step`` is a positive multiple of this; 0 = only at the end.
        per_class: samples per class (the count behind each metric is logged next to it).
        guidance_scale: classifier-free guidance scale used for the set.
        guidance_rescale: Lin et al. (2024) guidance rescale phi in [0, 1] (0 = plain CFG).
        guidance: the method (``ldm.model.guidance.GuidanceConfig``, conf/guidance); None = plain CFG.
        sampler: sampler settings as in ``conf/sampler`` (e.g. ``{name: ddim, steps: 50}``); None = DDIM 50.
        metrics: any of ``accuracy``, ``fid``, ``kid``, ``pr`` (and ``is``/``clip_score`` where available).
        seed: seed of the sampling noise; fixed so successive measurements differ only by the model.
        cache_dir: where the judge and the reference statistics are cached (``${paths.cache_dir}``).
        reference: ``mnist5k`` or a folder of real images; None: the training data's own (``metrics_reference`` of
            the DataModule: mnist5k for MNIST, the folder of ``data=folder``), refused at set-up where it has none.
        features: ``judge`` (MNIST digit classifier, offline) or ``inception`` (local weights); None: the judge's
            for the mnist5k reference, Inception's otherwise.
        batch_size: generation and feature-extraction batch size.
        at_train_end: also measure once when training ends.
        prefix: metric name prefix.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        per_class: int = 10,
        guidance_scale: float = 3.0,
        guidance_rescale: float = 0.0,
        guidance: Any = None,
        sampler: dict[str, Any] | None = None,
        metrics: list[str] | tuple[str, ...] = ("accuracy", "fid", "kid"),
        seed: int = 1234,
        cache_dir: str = ".cache/ldm",
        reference: str | None = None,
        features: str | None = None,
        batch_size: int = 256,
        at_train_end: bool = True,
        prefix: str = "val/",
    ) -> None:
        from ldm.metrics.suite import SAMPLE_METRICS, evaluation_config

        if every_n_steps < 0 or per_class < 1:
            raise ValueError(f"need every_n_steps >= 0 and per_class >= 1, got {every_n_steps}, {per_class}")
        unknown = sorted(set(metrics) - set(SAMPLE_METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; choose from {list(SAMPLE_METRICS)}")
        self.every_n_steps, self.per_class, self.guidance_scale = int(every_n_steps), int(per_class), float(guidance_scale)
        self.guidance_rescale = float(guidance_rescale)
        self.guidance_config, self._guidance = guidance, None  # resolved (the guide loaded) at setup
        self.sampler_cfg = dict(sampler) if sampler is not None else None
        self.metrics, self.seed, self.batch_size = [str(m) for m in metrics], int(seed), int(batch_size)
        self.at_train_end, self.prefix = bool(at_train_end), prefix
        self.cache_dir, self.reference, self.features = str(cache_dir), reference, features
        self.eval_cfg = None if reference is None else evaluation_config(self.cache_dir, reference,
                                                                         features or _features_for(reference), batch_size)
        self._measure = None  # SampleMetrics, built on first use (trains/loads the judge once)
        self._last_step = -1
        self.history: list[dict[str, float]] = []

    # --- hooks ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # At start-up, so an autoguidance guide that does not fit fails before any training.
        if pl_module is not None:
            self.guidance(pl_module)
        if self.eval_cfg is not None:
            return
        from ldm.errors import ConfigError
        from ldm.metrics.suite import evaluation_config

        datamodule = getattr(trainer, "datamodule", None)
        reference = getattr(datamodule, "metrics_reference", None)
        if reference is None:
            raise ConfigError(f"callbacks.sample_metrics compares samples with real images, and this data "
                              f"({type(datamodule).__name__}) names none it can read: set "
                              "callbacks.sample_metrics.reference=<a folder of real images> (with features=inception), "
                              "or train with callbacks=default")
        features = self.features or _features_for(reference)
        log.info("sample metrics: reference %s, %s features", reference, features)
        self.eval_cfg = evaluation_config(self.cache_dir, reference, features, self.batch_size)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # At the start of the batch after step N rather than at the end of step N: Lightning runs callback
        # hooks before the module's own on_train_batch_end, where the EMA weights take step N's update.
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.measure_and_log(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_train_end and trainer.global_step != self._last_step:
            self.measure_and_log(trainer, pl_module)

    # --- work -----------------------------------------------------------------------------------------
    def conditions(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        from ldm.data.captions import held_out_prompt

        conditioner = pl_module.model.conditioner
        num_classes = conditioner.num_classes or getattr(getattr(trainer, "datamodule", None), "num_classes", None)
        # Text models get a held-out prompt per class, so accuracy also measures prompt following.
        return conditioner.example_conditions(self.per_class, labels=range(num_classes) if num_classes else None,
                                              caption_for=held_out_prompt)

    def compute(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Generate the fixed set and measure it: ``{prefix + name: value, prefix + name_n: count, ...}``.

        Every rank calls it: each draws its share of the set batch by batch (``sample_stream``) and keeps only
        what the metrics need of each batch (features, the judge's predictions); those are gathered, the
        images never are, and every rank returns rank 0's numbers."""
        from ldm import distributed
        from ldm.metrics.final_samples import image_channels
        from ldm.metrics.suite import SampleMetrics, flat_metrics
        from ldm.model import sample_stream
        from ldm.model.latent_diffusion import sampling_autocast

        if pl_module.image_size is None:
            raise ValueError("the module has no image_size yet: SampleMetricsCallback needs a datamodule with image_size")
        sampler = pl_module.sampler()  # samples in eval mode (LatentDiffusion.sample owns it)
        conditions = self.conditions(trainer, pl_module)
        size = int(pl_module.image_size)
        guidance = self.guidance(pl_module).to(sampler.device)
        if self._measure is None:
            self._measure = SampleMetrics(self.eval_cfg, size, image_channels(sampler))
        seen = self._measure.observations(self.metrics, "label" in conditions, "caption" in conditions)
        autocast = sampling_autocast(sampler.device, trainer.precision)
        for batch in sample_stream(sampler, conditions, size, self.seed, self.batch_size, sampler=self.sampler_cfg,
                                   guidance_scale=self.guidance_scale, guidance_rescale=self.guidance_rescale,
                                   guidance=guidance, autocast_dtype=autocast):
            seen.update(batch.images, batch.conditions.get("label"), batch.conditions.get("caption"))
        results, skipped = self._measure.finish(seen)
        if distributed.rank() == 0:
            for name, reason in skipped.items():
                log.info("sample metric %s skipped: %s", name, reason)
        flat = flat_metrics(results, self.prefix)
        # Values with their counts; settings such as KID's subset count stay out of the curves.
        return {k: float(v) for k, v in flat.items() if k.endswith(_LOGGED_SUFFIXES) or k[len(self.prefix):] in results}

    def guidance(self, pl_module: pl.LightningModule) -> Any:
        if self._guidance is None:  # compute() called outside a Trainer's fit
            from ldm.io.guide import resolve_guidance

            self._guidance = resolve_guidance(self.guidance_config, pl_module.model, "of this run", device="cpu")
        return self._guidance

    def measure_and_log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        self._last_step = trainer.global_step
        values = self.compute(trainer, pl_module)  # identical on every rank
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        self.history.append({"step": float(trainer.global_step), **values})
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
