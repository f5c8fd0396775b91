"""Image-text pairs in webdataset tar shards (data module ``wds_captions``).

A shard is a tar of samples grouped by key: ``<key>.jpg|png|webp|bmp`` and ``<key>.txt`` (one
caption) or ``<key>.json`` (``{"caption": ...}`` or ``{"captions": [...]}``). ``sizes.json``
beside the shards (open_clip's convention, written by ``mml data``) gives each shard's sample
count; without it the shards are counted once at start-up. The shards are the units of a
``streams.SampleStream``: how epochs are divided over ranks and workers, resumed and how bad
samples are counted is said there.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mmlightning.data_modules.common import IMAGE_EXTENSIONS
from mmlightning.data_modules.streams import BadSample, StreamedCaptionData
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES

SIZES_FILE = "sizes.json"


# ---------------------------------------------------------------------- shards on disk
def expand_shards(spec: str | list[str], key: str) -> list[str]:
    """Shard URLs from brace patterns (``data/shard-{000000..000009}.tar``), a folder of
    ``*.tar``, or a list of either; local paths must exist, fsspec URLs (``s3://...``) are
    opened as they are read."""
    from braceexpand import braceexpand

    urls: list[str] = []
    for item in [spec] if isinstance(spec, str) else list(spec or []):
        item = str(item)
        if "://" not in item and Path(item).is_dir():
            urls += sorted(str(p) for p in Path(item).glob("*.tar"))
        else:
            urls += list(braceexpand(item))
    if not urls:
        raise UserError(f"{key}: no shards in {spec!r}.")
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise UserError(f"{key}: {len(missing)} shard(s) missing, e.g. {missing[0]!r}.")
    return urls


def open_shard(url: str) -> io.BufferedIOBase:
    if "://" in url:
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order (webdataset's tar reader and key grouping). A tar
    that ends early or cannot be read raises ``tarfile.TarError`` / ``OSError`` after the
    samples before the damage."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    with open_shard(url) as stream:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        yield from group_by_keys(files)


def count_samples(url: str) -> int:
    n = 0
    try:
        for _ in shard_samples(url):
            n += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def shard_sizes(urls: list[str]) -> list[int]:
    """Samples per shard from ``sizes.json`` next to the shards, else by reading them."""
    sizes: dict[str, int] = {}
    for folder in {u.rsplit("/", 1)[0] if "/" in u else "." for u in urls}:
        path = f"{folder}/{SIZES_FILE}"
        try:
            with open_shard(path) as f:
                sizes.update({f"{folder}/{k}": int(v) for k, v in json.load(f).items()})
        except (FileNotFoundError, OSError, ValueError):
            continue
    return [sizes[u] if u in sizes else count_samples(u) for u in urls]


def sample_captions(sample: dict[str, Any], where: str) -> list[str]:
    """``json``'s ``captions`` (a list) or ``caption``, else ``txt``."""
    captions = None
    try:
        if "json" in sample:
            meta = json.loads(sample["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
            captions = meta.get("captions") or ([meta["caption"]] if "caption" in meta else None)
            if captions is not None and not isinstance(captions, list):
                raise ValueError(f"'captions' is a {type(captions).__name__}, not a list")
        if captions is None and "txt" in sample:
            captions = [sample["txt"].decode("utf-8")]
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise BadSample("bad_caption", where, str(err).splitlines()[0]) from None
    if captions is None:
        raise BadSample("missing_caption", where, "no txt, and no 'caption' or 'captions' in json")
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise BadSample("empty_caption", where)
    return captions


def sample_image_bytes(sample: dict[str, Any], where: str) -> bytes:
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise BadSample("missing_image", where)
    return sample[ext]


class ShardSource:
    """Tar shards as the units of a sample stream."""

    damage = (tarfile.TarError, OSError, EOFError)

    def __init__(self, urls: list[str]) -> None:
        self.names, self.sizes = urls, shard_sizes(urls)

    def read(self, unit: int, first: int, end: int) -> Iterator[tuple[int, str, dict[str, Any]]]:
        url = self.names[unit]
        for position, sample in enumerate(shard_samples(url)):
            if position >= end:
                break
            if position >= first:
                yield position, f"{url} key {sample.get('__key__')!r}", sample

    @staticmethod
    def parse(sample: dict[str, Any], where: str) -> tuple[bytes, list[str]]:
        return sample_image_bytes(sample, where), sample_captions(sample, where)


@DATA_MODULES.register("wds_captions")
class ShardCaptionData(StreamedCaptionData):
    """Image-caption pairs from webdataset shards, for CLIP and captioning recipes (the
    batches carry both layouts). ``train_shards`` etc.: a folder of ``*.tar``, a brace
    pattern, a list of either, or fsspec URLs."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_shards: Any,
                 val_shards: Any = None, test_shards: Any = None, mode: str = "epochs",
                 samples_per_epoch: int | None = None, batch_size: int = 256, eval_batch_size: int = 256,
                 num_workers: int = 4, shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01,
                 strict: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0), shuffle_seed: int = 0) -> None:
        specs = {"train": train_shards, "val": val_shards, "test": test_shards}
        super().__init__(tokenizer, max_length, image_config, specs, {split: f"{split}_shards" for split in specs},
                         mode, samples_per_epoch, batch_size, eval_batch_size, num_workers, shuffle_buffer,
                         max_bad_fraction, strict, crop_scale, shuffle_seed)
        for split, spec in specs.items():  # a mistyped path fails now, not after training
            if spec:
                expand_shards(spec, f"data.{split}_shards")

    def open_source(self, split: str) -> ShardSource:
        return ShardSource(expand_shards(self.specs[split], f"data.{split}_shards"))
