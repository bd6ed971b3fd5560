"""Streaming shards: the format ``ldm-prepare`` writes and ``data=stream`` reads (litdata chunks).

A shard folder is a litdata dataset: chunk files ``shard-<n>-<i>.bin`` and one ``index.json`` (litdata's
``chunks`` + ``config``, plus an ``"ldm"`` entry: :func:`read_index`). Every sample is a dict with the same keys
in every shard (litdata fixes the layout from the first sample):

==================  =======  ===================================================================================
field               type     meaning
==================  =======  ===================================================================================
id                  int      stable sample id, ``shard number * 2**32 + position in the shard``: unique, and the
                             seed of the sample's random crop and flip, ``(seed, epoch, id)``
key                 str      the source's own name: relative file path, ``<dataset>/<split>/<index>``, or the
                             webdataset ``__key__`` (``<tar stem>/<key>``)
image               bytes    the image file in its original encoding (JPEG, PNG, ...; torchvision arrays as PNG)
caption             str      ``""`` when the source has no caption for it (``has_captions`` false: none at all)
label               int      class index, ``-1`` when the source is unlabelled (``num_classes`` null)
width, height       int      original size in pixels, before any resize or crop (img2dataset: its
                             ``original_width``/``original_height``)
aspect              float    ``width / height``
==================  =======  ===================================================================================

``ldm-prepare encode=true`` adds, for the image resized (shorter side) and centre-cropped to
``encode.image_size`` as training would, with the float dtype ``encode.latent_dtype``:

==================  ===============================================================================================
latent_mean         (C, h, w) the frozen first stage's posterior mean (unscaled: training multiplies by its scale)
latent_std          (C, h, w) the posterior std (training samples ``mean + std * noise``, as when encoding live)
latent_mean_flip,   the same for the mirrored image (only when ``encode.flips``); training picks one of the two
latent_std_flip     with the flip draw the image path would make
caption_embedding   (L, D) the frozen text encoder's tokens for ``caption`` (only when the conditioner has one)
==================  ===============================================================================================

Shards are written one source slice at a time into a temporary folder; its chunks are then renamed into place
and a manifest ``.manifests/shard-<n>.json`` is written last (atomically), so a manifest means a complete shard.
A re-run skips the slices whose manifest exists and was written from the same source slice with the same
settings; ``index.json`` is (re)written once every slice has one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ldm.io.export import write_text_atomic

FORMAT = "ldm-stream-shards"
VERSION = 1
INDEX = "index.json"
MANIFESTS = ".manifests"
ID_STRIDE = 2**32  # samples per shard can never reach it: ids of different shards never collide
IMAGE_FIELDS = ("id", "key", "image", "caption", "label", "width", "height", "aspect")


class ShardError(ValueError):
    """A shard folder that cannot be trained from: missing, unfinished, corrupt or of other settings."""


def sample_id(shard: int, position: int) -> int:
    if not 0 <= position < ID_STRIDE:
        raise ValueError(f"a shard holds at most {ID_STRIDE - 1} samples, got position {position}")
    return shard * ID_STRIDE + position


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifest_path(out: Path, shard: int) -> Path:
    return out / MANIFESTS / f"shard-{shard:06d}.json"


def finished_manifest(out: Path, shard: int, source_key: str, settings: str) -> dict[str, Any] | None:
    """The manifest of a finished shard, None when the slice still has to be written. A manifest of another
    source slice or other settings is an error: its samples cannot be mixed with the new ones."""
    path = manifest_path(out, shard)
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    for name, mine, theirs in (("source slice", source_key, manifest.get("source_key")),
                               ("settings", settings, manifest.get("settings"))):
        if mine != theirs:
            raise ShardError(
                f"{out} already holds shard {shard} written from another {name} ({theirs} vs now {mine}): the "
                "source or the ldm-prepare settings changed since. Write to a new output folder, or delete "
                f"{out} to rewrite it")
    return manifest


class ShardWriter:
    """One shard being written: :meth:`add` its samples (dicts with the fields above) in order, then
    :meth:`finish` commits it with its manifest. Several may be open at once (one per source slice in flight)."""

    def __init__(self, out: Path, shard: int, source_key: str, settings: str, chunk_bytes: int | str) -> None:
        from litdata.streaming.writer import BinaryWriter

        self.out, self.shard, self.source_key, self.settings = out, shard, source_key, settings
        self.tmp = out / f".tmp-shard-{shard:06d}-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.writer = BinaryWriter(str(self.tmp), chunk_bytes=chunk_bytes)
        self.count = 0

    def add(self, sample: dict[str, Any]) -> None:
        self.writer[self.count] = sample
        self.count += 1

    def finish(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Move the chunks into place and write the manifest (last: it marks the shard complete)."""
        self.writer.done()
        chunks, config = [], None
        for index_file in sorted(self.tmp.glob("*.index.json")):
            written = json.loads(index_file.read_text())
            config = written["config"]
            for i, chunk in enumerate(written["chunks"]):
                # litdata names chunks after the writing process; shard-<n>-<i> keeps every slice's own names.
                name = f"shard-{self.shard:06d}-{i:05d}.bin"
                os.replace(self.tmp / chunk["filename"], self.out / name)
                chunks.append({**chunk, "filename": name})
        manifest = {"shard": self.shard, "source_key": self.source_key, "settings": self.settings,
                    "num_samples": self.count, "chunks": chunks, "config": config, **(extra or {})}
        write_text_atomic(manifest_path(self.out, self.shard), json.dumps(manifest, sort_keys=True))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return manifest


def write_shard(out: Path, shard: int, samples: Iterable[dict[str, Any]], source_key: str, settings: str,
                chunk_bytes: int | str, extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write one shard's ``samples`` and commit it with its manifest; ``extra()`` (called once ``samples`` is
    exhausted, e.g. to count what it skipped) adds entries to the manifest."""
    writer = ShardWriter(out, shard, source_key, settings, chunk_bytes)
    for sample in samples:
        writer.add(sample)
    return writer.finish(extra() if extra else None)


def write_index(out: Path, manifests: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Join the shards' chunks into litdata's ``index.json`` with this format's ``"ldm"`` entry."""
    manifests = sorted(manifests, key=lambda m: m["shard"])
    configs = [m["config"] for m in manifests if m["config"] is not None]
    if not configs:
        raise ShardError(f"no readable sample in any of the {len(manifests)} source slices: nothing to write to {out}")
    layout = {key: value for key, value in configs[0].items() if key != "types"}
    for manifest in manifests:
        other = {key: value for key, value in (manifest["config"] or configs[0]).items() if key != "types"}
        if other != layout:
            raise ShardError(f"shard {manifest['shard']} of {out} has another sample layout ({other['data_format']} vs "
                             f"{layout['data_format']}): delete {out} and run ldm-prepare again")
    chunks = [chunk for m in manifests for chunk in m["chunks"]]
    ldm = {"format": FORMAT, "version": VERSION, "num_samples": sum(m["num_samples"] for m in manifests),
           "num_shards": len(manifests), **meta}
    index = {"chunks": chunks, "config": configs[0], "updated_at": str(time.time()), "ldm": ldm}
    write_text_atomic(out / INDEX, json.dumps(index, sort_keys=True))
    os.chmod(out / INDEX, 0o644)  # readable by every user of a shared folder, like the chunks
    return ldm


def read_index(path: str | Path, check_chunks: bool = True) -> dict[str, Any]:
    """The ``"ldm"`` metadata of a local shard folder (or of a remote one's cached ``index.json``), checked.

    Raises :class:`ShardError` naming the fix for a missing, empty, unfinished or corrupt folder. With
    ``check_chunks`` every chunk file must exist with the size the index records (a truncated copy, a
    failed download, a half-synced bucket), which costs one ``stat`` per chunk.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ShardError(f"shard folder {folder} does not exist: write shards with `ldm-prepare source=... "
                         f"output={folder}`, or point data.path at a folder ldm-prepare wrote")
    index_file = folder / INDEX
    if not index_file.is_file():
        if (folder / MANIFESTS).is_dir():
            raise ShardError(f"{folder} holds unfinished shards (ldm-prepare stopped before writing {INDEX}): run "
                             "the same ldm-prepare command again to finish them")
        raise ShardError(f"no shards in {folder} (no {INDEX}): write them with `ldm-prepare source=... "
                         f"output={folder}`")
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(f"{index_file} is corrupt ({error}): run ldm-prepare again with the same output "
                         "(finished shards are kept and the index rewritten)") from None
    meta = index.get("ldm") if isinstance(index, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ShardError(f"{index_file} was not written by ldm-prepare (no 'ldm' entry of format {FORMAT}): "
                         "convert the data with ldm-prepare")
    if int(meta.get("version", 0)) > VERSION:
        raise ShardError(f"{folder} is of shard format version {meta['version']}, newer than this ldm reads "
                         f"({VERSION}): update ldm")
    if not index.get("chunks") or not meta.get("num_samples"):
        raise ShardError(f"{folder} holds no samples: run ldm-prepare on a source with readable images")
    if check_chunks:
        for chunk in index["chunks"]:
            file = folder / chunk["filename"]
            size = file.stat().st_size if file.is_file() else None
            if size != int(chunk["chunk_bytes"]):
                shard = chunk["filename"].split("-")[1]
                state = "is missing" if size is None else f"has {size} bytes, the index says {chunk['chunk_bytes']}"
                raise ShardError(f"shard chunk {file} {state}: the shard is corrupt. Delete "
                                 f"{folder / MANIFESTS / f'shard-{shard}.json'} and {INDEX} and run the same "
                                 "ldm-prepare command again to rewrite that shard")
    return meta
