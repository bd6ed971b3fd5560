"""``ldm-prepare``: convert a dataset into streaming shards for ``ldm-train data=stream`` (litdata format).

    ldm-prepare source=folder source.root=images/ output=shards/train
    ldm-prepare source=webdataset "source.urls='laion/{00000..00099}.tar'" output=shards/laion num_workers=8
    ldm-prepare source=torchvision source.name=cifar10 source.root=data output=shards/cifar
    ldm-prepare source=webdataset ... encode=true first_stage.path=<stage-1 export> cond=text   # + latents
    torchrun --nproc-per-node 8 -m ldm.prepare source=webdataset ... encode=true ...             # 8 GPUs

The sample fields and the folder layout are documented in :mod:`ldm.data.shards`. Each source slice becomes one
shard, written atomically; running the same command again skips finished shards, so an interrupted run is
finished by re-running it. Unreadable images are skipped and counted (``max_corrupt_fraction`` as in data=folder).
Under torchrun each rank writes every WORLD_SIZE-th slice (:mod:`ldm.data.prepare_slices`); the shards do not
depend on the number of ranks.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ldm.backends import set_tf32
from ldm.config import (
    ConfigError,
    check_constructor_keys,
    instantiate_checked,
    register_resolvers,
    user_errors_as_messages,
)
from ldm.data import shards
from ldm.data.image_files import check_corrupt_fraction
from ldm.data.prepare_slices import (
    barrier,
    check_sample,
    encode_device,
    encode_slices,
    process_group,
    resolved_yaml,
    sum_over_ranks,
)

log = logging.getLogger("ldm.prepare")
register_resolvers()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
_FIRST_FEW = 5


class SliceWriter:
    """Turns one source slice into one shard: checks and measures every image, writes. With encode=true it holds
    the networks (this process's one copy) and the settings the shards record; :func:`encode_slices` writes."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.source = instantiate_checked(cfg.source, "source")
        self.encoder = build_encoder(cfg) if cfg.encode else None
        self.out = Path(str(cfg.output))
        self.pieces = self.source.slices()
        self.settings = shards.settings_hash({
            "source": OmegaConf.to_container(cfg.source, resolve=True),
            "encode": self.encoder.settings() if self.encoder is not None else None,
        })

    def __call__(self, piece_index: int) -> dict[str, Any]:
        piece = self.pieces[piece_index]
        done = shards.finished_manifest(self.out, piece.index, piece.key, self.settings)
        if done is not None:
            return {**done, "skipped_existing": True}
        skipped: list[str] = []
        samples = self._samples(piece, skipped)
        return shards.write_shard(self.out, piece.index, samples, piece.key, self.settings, self.cfg.chunk_bytes,
                                  extra=lambda: {"num_skipped": len(skipped), "skipped": skipped[:_FIRST_FEW]})

    def _samples(self, piece, skipped: list[str]):
        """The slice's readable samples, in order (encode=true runs through :func:`encode_slices` instead)."""
        position = 0
        for raw in self.source.read(piece):
            sample = check_sample(raw, piece.index, position, skipped)
            if sample is not None:
                position += 1
                yield sample


def build_encoder(cfg: DictConfig):
    """The frozen first stage and, when the conditioner has one, the frozen text encoder: one copy per process,
    on this rank's GPU under torchrun."""
    from ldm.data.shard_encoding import ShardEncoder, frozen_text_encoder

    if OmegaConf.select(cfg, "first_stage.path") is None:
        raise ConfigError("encode=true needs the frozen first stage: set first_stage.path=<stage-1 run>/export")
    first_stage = instantiate_checked(cfg.first_stage, "first_stage")
    conditioner = instantiate_checked(cfg.cond.conditioner, "cond.conditioner") if cfg.get("cond") else None
    settings = cfg.encode_settings
    embedding_dtype = settings.get("embedding_dtype")
    return ShardEncoder(first_stage, frozen_text_encoder(conditioner), int(settings.image_size), str(settings.mode),
                        bool(settings.flips), str(settings.latent_dtype), encode_device(str(settings.device)),
                        None if embedding_dtype is None else str(embedding_dtype))


_WORKER: SliceWriter | None = None


def _init_worker(cfg_yaml: str) -> None:
    global _WORKER
    register_resolvers()
    _WORKER = SliceWriter(OmegaConf.create(cfg_yaml))


def _run_in_worker(piece_index: int) -> dict[str, Any]:
    assert _WORKER is not None
    return _WORKER(piece_index)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """Write every unfinished shard, then the index; returns the index's metadata plus run counts. Under
    torchrun, this rank's share of the slices, then (rank 0) the index of all of them."""
    check_constructor_keys(cfg.source, "source")
    if cfg.output in (None, "???"):
        raise ConfigError("set output=<folder> for the shards")
    if int(cfg.num_workers) < 0:
        raise ConfigError(f"num_workers must be >= 0, got {cfg.num_workers}")
    with process_group() as (rank, world):
        return _prepare(cfg, rank, world)


def _prepare(cfg: DictConfig, rank: int, world: int) -> dict[str, Any]:
    writer = SliceWriter(cfg)
    pieces = writer.pieces
    writer.out.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(pieces), world))
    if writer.encoder is not None:
        manifests = encode_slices(writer, mine, cfg, rank, world)
    elif int(cfg.num_workers) > 0 and len(mine) > 1:
        # Spawned (not forked) workers: a forked process inheriting torch's thread pools can deadlock.
        with ProcessPoolExecutor(int(cfg.num_workers), mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(resolved_yaml(cfg),)) as pool:
            manifests = list(pool.map(_run_in_worker, mine))
    else:
        manifests = [writer(i) for i in mine]
    reused, written = sum_over_ranks([sum(bool(m.get("skipped_existing")) for m in manifests),
                                      sum(not m.get("skipped_existing") for m in manifests)])
    barrier()  # every rank's shards are committed: their manifests are on disk
    if world > 1:
        manifests = [shards.finished_manifest(writer.out, p.index, p.key, writer.settings) for p in pieces]
    total_skipped = sum(int(m.get("num_skipped", 0)) for m in manifests)
    total = total_skipped + sum(int(m["num_samples"]) for m in manifests)
    examples = [key for m in manifests for key in m.get("skipped", [])]
    check_corrupt_fraction(total_skipped, total, float(cfg.max_corrupt_fraction), str(cfg.source.get("root") or
                           cfg.source.get("urls")), examples)
    class_names = list(getattr(writer.source, "class_names", []) or [])
    if rank == 0:
        meta = shards.write_index(writer.out, [{k: v for k, v in m.items() if k != "skipped_existing"} for m in manifests], {
            "has_captions": bool(writer.source.has_captions),
            "num_classes": len(class_names) or None,
            "class_names": class_names,
            "skipped_unreadable": total_skipped,
            "source": OmegaConf.to_container(cfg.source, resolve=True),
            "encode": writer.encoder.settings() if writer.encoder is not None else None,
        })
        log.info("%d samples in %d shards under %s (%d shards reused, %d unreadable images skipped)",
                 meta["num_samples"], meta["num_shards"], writer.out, reused, total_skipped)
    barrier()  # the index is written
    if rank != 0:
        meta = shards.read_index(writer.out)
    return {**meta, "shards_written": written, "shards_reused": reused}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with user_errors_as_messages("ldm-prepare"):
        set_tf32(cfg.get("tf32"))
        result = prepare(cfg)
    print(f"ldm-prepare: {result['num_samples']} samples in {result['num_shards']} shards at {cfg.output} "
          f"({result['shards_written']} written, {result['shards_reused']} already finished, "
          f"{result['skipped_unreadable']} unreadable images skipped)", flush=True)


if __name__ == "__main__":
    main()
