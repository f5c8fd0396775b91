"""Read back what an offline wandb run logged, for use in tests.

In offline mode wandb (0.31) writes no ``wandb-summary.json`` or
``config.yaml``; everything the run logged lives only in
``<run dir>/run-<id>.wandb``. That file is a LevelDB-style log of serialized
``wandb.proto.wandb_internal_pb2.Record`` messages (the format of the former
``wandb/sdk/internal/datastore.py``, now written by the Go ``wandb-core``).

Layout, checked byte by byte against files written by wandb 0.31.0:

* File header, 7 bytes: ident ``b":W&B"``, magic ``0xBEE1`` (uint16, little
  endian, so the bytes are ``e1 be``), version ``0`` (uint8).
* The file is cut into 32 KiB blocks counted from file offset 0, so the file
  header sits inside the first block.
* Each block holds chunks: crc32 (uint32 LE), data length (uint16 LE), type
  (uint8: FULL=1, FIRST=2, MIDDLE=3, LAST=4), then the data. One record is a
  single FULL chunk, or FIRST, MIDDLE..., LAST when it crosses blocks.
  A FIRST chunk may carry no data when exactly 7 bytes were left in a block.
* When fewer than 7 bytes (a chunk header) are left in a block the writer
  zero-pads to the next block.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from wandb.proto.wandb_internal_pb2 import (
    ConfigRecord,
    HistoryItem,
    Record,
    SummaryRecord,
)

FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
FILE_IDENT = b":W&B"
FILE_MAGIC = 0xBEE1
FILE_VERSION = 0

BLOCK_LEN = 32 * 1024
CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type

FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

# The internal bookkeeping key wandb adds to config and summary.
WANDB_INTERNAL_KEY = "_wandb"


def find_run_files(root: str | Path) -> list[Path]:
    """All ``run-*.wandb`` files under ``root`` (recursively), sorted."""
    return sorted(Path(root).rglob("run-*.wandb"))


def _chunk_crc(chunk_type: int, data: bytes) -> int:
    # Unlike real LevelDB (crc32c, masked), wandb uses plain zlib/IEEE crc32
    # over the type byte followed by the data, unmasked.
    return zlib.crc32(data, zlib.crc32(bytes([chunk_type])))


def _iter_payloads(buf: bytes, path: Path) -> Iterator[bytes]:
    """Yield the serialized bytes of each complete record in ``buf``.

    A truncated tail (a file copied or read while wandb is still writing)
    ends the iteration quietly; anything else malformed raises ValueError,
    because a corrupt record in the middle means the test data is wrong.
    """
    if len(buf) < FILE_HEADER.size:
        return
    ident, magic, version = FILE_HEADER.unpack_from(buf, 0)
    if (ident, magic, version) != (FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise ValueError(f"{path}: not a wandb .wandb file (header {buf[:7]!r})")

    pos = FILE_HEADER.size
    pending: bytearray | None = None  # data of a record split across blocks
    while True:
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < CHUNK_HEADER.size:
            pos += left_in_block  # zero padding, no chunk fits here
        if pos + CHUNK_HEADER.size > len(buf):
            return  # clean EOF, or a truncated chunk header
        crc, length, chunk_type = CHUNK_HEADER.unpack_from(buf, pos)
        start = pos + CHUNK_HEADER.size
        end = start + length
        if end > len(buf):
            return  # truncated chunk data
        data = buf[start:end]
        if chunk_type not in (FULL, FIRST, MIDDLE, LAST):
            raise ValueError(f"{path}: bad chunk type {chunk_type} at offset {pos}")
        if _chunk_crc(chunk_type, data) != crc:
            raise ValueError(f"{path}: crc mismatch in chunk at offset {pos}")

        # FIRST/MIDDLE/LAST must arrive in order; a stray one is corruption.
        if chunk_type == FULL:
            if pending is not None:
                raise ValueError(f"{path}: unfinished record before offset {pos}")
            yield data
        elif chunk_type == FIRST:
            if pending is not None:
                raise ValueError(f"{path}: unfinished record before offset {pos}")
            pending = bytearray(data)
        else:
            if pending is None:
                raise ValueError(f"{path}: continuation chunk without start at {pos}")
            pending += data
            if chunk_type == LAST:
                yield bytes(pending)
                pending = None
        pos = end
        # A FIRST/MIDDLE without its LAST at EOF is simply dropped.


def read_records(path: str | Path) -> list[Record]:
    """Parse every complete record of a ``.wandb`` file, in file order."""
    path = Path(path)
    records = []
    for payload in _iter_payloads(path.read_bytes(), path):
        record = Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


@dataclass
class WandbRun:
    """What a run logged, decoded into plain Python values."""

    run_id: str
    project: str
    name: str
    group: str
    tags: list[str] = field(default_factory=list)
    # Nested dicts as wandb stores them, e.g. {"model": {"lr": 0.1}}.
    config: dict[str, Any] = field(default_factory=dict)
    # One dict per logged step; nested keys joined with ".", e.g. "nested.a".
    # Includes wandb's own _step, _runtime and _timestamp.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Last value per key, keys joined like history.
    summary: dict[str, Any] = field(default_factory=dict)


def _key_path(key: str, nested_key: Sequence[str]) -> list[str]:
    # Items carry either a plain `key` or a `nested_key` path, never both.
    return list(nested_key) if nested_key else [key]


def _history_value(item: HistoryItem) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    # The typed oneof is an alternative encoding; wandb 0.31 itself writes
    # value_json, but accept both so the reader does not silently lose data.
    kind = item.WhichOneof("value")
    if kind is None or kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _apply_config(config: dict[str, Any], record: ConfigRecord) -> None:
    for update in record.update:
        *parents, leaf = _key_path(update.key, update.nested_key)
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(update.value_json)
    for remove in record.remove:
        *parents, leaf = _key_path(remove.key, remove.nested_key)
        node = config
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)


def _apply_summary(summary: dict[str, Any], record: SummaryRecord) -> None:
    for update in record.update:
        summary[".".join(_key_path(update.key, update.nested_key))] = json.loads(
            update.value_json
        )
    for remove in record.remove:
        summary.pop(".".join(_key_path(remove.key, remove.nested_key)), None)


def _summary_from_history(history: Iterable[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for row in history:
        summary.update(row)
    return summary


def read_run(path: str | Path, wait_s: float = 30.0) -> WandbRun:
    """Decode a ``run-<id>.wandb`` file into a :class:`WandbRun`.

    wandb's core process writes the file on its own schedule, and ``run.finish()`` can return
    before the last block reaches the disk: wait (up to ``wait_s``) for the run's exit record."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            records = read_records(path)
        except ValueError:  # a block still being written
            records = []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    run_records = [r.run for r in records if r.HasField("run")]
    if not run_records:
        raise ValueError(f"{path}: no run record (file truncated too early?)")
    # The first run record is the one wandb.init sent; later ones (resume,
    # updates) do not change the identity fields we report.
    info = run_records[0]

    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    saw_summary = False
    _apply_config(config, info.config)
    if info.summary.update:
        _apply_summary(summary, info.summary)
        saw_summary = True

    history: list[dict[str, Any]] = []
    # Replay in file order: config and summary records are incremental
    # updates, so later ones override earlier ones.
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "config":
            _apply_config(config, record.config)
        elif kind == "summary":
            _apply_summary(summary, record.summary)
            saw_summary = True
        elif kind == "history":
            history.append(
                {
                    ".".join(_key_path(item.key, item.nested_key)): _history_value(item)
                    for item in record.history.item
                }
            )

    if not saw_summary:
        summary = _summary_from_history(history)
    # wandb's bookkeeping (runtime, versions, ...) is not something the code
    # under test logged.
    config.pop(WANDB_INTERNAL_KEY, None)
    summary = {
        key: value
        for key, value in summary.items()
        if key.split(".", 1)[0] != WANDB_INTERNAL_KEY
    }

    return WandbRun(
        run_id=info.run_id,
        project=info.project,
        name=info.display_name,
        group=info.run_group,
        tags=list(info.tags),
        config=config,
        history=history,
        summary=summary,
    )
