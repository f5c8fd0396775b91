"""Image-caption samples streamed by every rank and loader worker, from any source that
can be read in numbered units: webdataset tar shards (``shards.py``) and Parquet row groups
or in-memory tables (``tables.py``).

A **source** is a list of units with their sample counts (``sizes``) and two methods:
``read(unit, first, end)`` yields ``(position, where, raw)`` for the unit's samples in
``[first, end)`` (raising ``source.damage`` errors, e.g. ``tarfile.TarError``, if the unit
is damaged) and ``parse(raw, where)`` gives ``(image bytes, captions)`` or raises
``BadSample``. Global sample ids number the samples in unit order as listed.

**Finite epochs** (``mode: epochs``): the epoch's order is the units permuted from (seed,
epoch), one sample stream; each of the ``ranks x workers`` readers takes one contiguous
slice of it, so every sample belongs to exactly one reader, and a reader opens only the
units its slice covers. Evaluation reads every sample exactly once. Training also shuffles
within a reader (a seeded buffer) and gives every reader the same number of full batches,
which DDP's lockstep and contrastive losses need: each reader drops the last few samples of
its slice that do not fill a batch (fewer than ``batch_size`` + 1 per reader, different ones
each epoch) and refills batches lost to bad samples from the start of its slice again
(counted as ``repeated``). A reader that yields no batch at all cannot report its counts.

**Resampled streams** (``mode: resampled``): each reader draws units with replacement from
(seed, epoch, reader); an epoch is ``samples_per_epoch`` samples.

**Bad samples** (undecodable or missing image, malformed, missing or empty caption, samples
lost to a truncated or unreadable unit) are skipped and counted by kind; the counts are
logged each epoch summed over ranks (``data/<split>_skipped_<kind>``), and the run stops on
every rank with an error naming the counts and examples once skips pass ``max_bad_fraction``
of an epoch (default 1%), checked every ``log_every_n_steps``. ``strict: true`` stops at the
first one instead (at once in one process without loader workers; else at the next batch),
naming the unit and the sample.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmlightning.data_modules.base import TaskData
from mmlightning.data_modules.transforms import eval_transform, train_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError

SKIP_KINDS = ("bad_image", "missing_image", "bad_caption", "missing_caption", "empty_caption", "truncated", "repeated")
BAD_KINDS = SKIP_KINDS[:-1]  # "repeated" counts refills, not bad samples


class BadSample(Exception):
    def __init__(self, kind: str, where: str, detail: str = "") -> None:
        super().__init__(f"{kind.replace('_', ' ')}: {where}{': ' + detail if detail else ''}")
        self.kind, self.where = kind, where


# ---------------------------------------------------------------------- one sample
def decode_image(data: bytes, size: int | None = None) -> Image.Image:
    """PIL decode to RGB; given the smallest side the transform needs (``size``), a JPEG at
    least twice that is decoded at a reduced scale (``draft``: the DCT skips the detail the
    resize would throw away), several times faster."""
    image = Image.open(io.BytesIO(data))
    if image.format == "JPEG" and size:
        image.draft("RGB", (size, size))
    return image.convert("RGB")


def parsed_samples(source: Any, plan: Any,
                   on_bad: Callable[[BadSample, int], None]) -> Iterator[tuple[int, int, str, Any, bytes, list[str]]]:
    """(unit, position, where, raw sample, image bytes, captions) of each sample of the planned (unit,
    first, end) ranges that parses; ``on_bad(bad, n)`` for the others, ``n`` > 1 for the
    samples lost to a damaged or short unit. How every reader of a source walks it."""
    for unit, first, end in plan:
        seen, error = first, None
        try:
            for position, where, raw in source.read(unit, first, end):
                seen = position + 1
                try:
                    data, captions = source.parse(raw, where)
                except BadSample as bad:
                    on_bad(bad, 1)
                    continue
                yield unit, position, where, raw, data, captions
        except source.damage as err:
            error = f"{type(err).__name__}: {err}"
        if seen < end:  # damaged, or shorter than its recorded size
            on_bad(BadSample("truncated", source.names[unit], f"{error or 'ends early'}; {end - seen} sample(s) lost"),
                   end - seen)


def caption_hash(caption: str) -> int:
    """Equal caption strings get equal ids in every reader (64-bit FNV-1a, made positive)."""
    h = 0xCBF29CE484222325
    for byte in caption.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


# ---------------------------------------------------------------------- the stream
class SampleStream(IterableDataset):
    """Yields whole batches (built in the loader worker) in the layout of common.py, plus
    ``skipped`` (this reader's counts this epoch, one per SKIP_KINDS) and ``reader``, which
    the data module takes off before the batch reaches the model."""

    def __init__(self, source: Any, train: bool, batch_size: int, tokenizer: Any, max_length: int,
                 image_config: ImageConfig, seed: int, mode: str = "epochs", samples_per_epoch: int | None = None,
                 shuffle_buffer: int = 1000, strict: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0)) -> None:
        self.source, self.sizes, self.train, self.batch_size = source, list(source.sizes), train, batch_size
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.seed, self.mode, self.samples_per_epoch = seed, mode, samples_per_epoch
        self.shuffle_buffer, self.strict = shuffle_buffer if train else 0, strict
        self.transform = train_transform(image_config, crop_scale) if train else eval_transform(image_config)
        # decode no smaller than what the transform crops from: the resize before the centre
        # crop (eval), or the smallest random crop scaled to the output size (train)
        self.decode_size = math.ceil(image_config.size / (math.sqrt(crop_scale[0]) if train else image_config.crop_pct))
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)  # global ids: unit order
        self.epoch, self.skip_batches = 0, 0
        self.world, self.rank = 1, 0

    # how the epoch is divided ------------------------------------------------------------
    def readers(self) -> tuple[int, int]:
        """(this reader's index, number of readers) over all ranks and loader workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world * workers

    def samples_per_epoch_total(self) -> int:
        return self.samples_per_epoch if self.mode == "resampled" else int(self.offsets[-1])

    def batches_per_reader(self, readers: int) -> int:
        return (self.samples_per_epoch_total() // readers) // self.batch_size

    def batches_per_rank(self, num_workers: int) -> int:
        """Training batches one rank steps through per epoch, with ``num_workers`` loader workers."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world = torch.distributed.get_world_size() if distributed else 1
        workers = max(1, num_workers)
        return self.batches_per_reader(world * workers) * workers

    def slice_plan(self, reader: int, readers: int, epoch: int) -> list[tuple[int, int, int]]:
        """(unit, first, end) sample ranges this reader reads this epoch, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.sizes)) if self.train else np.arange(len(self.sizes))
        total = int(self.offsets[-1])
        lo, hi = reader * total // readers, (reader + 1) * total // readers
        plan, start = [], 0
        for unit in order:
            size = self.sizes[unit]
            first, end = max(lo - start, 0), min(hi - start, size)
            if first < end:
                plan.append((int(unit), first, end))
            start += size
        return plan

    # reading ------------------------------------------------------------------------------
    def read(self, plan: Any, counts: dict[str, int],
             examples: list[str]) -> Iterator[tuple[torch.Tensor, list[str], int]]:
        """(image, captions, global sample id) for each good sample of the planned
        (unit, first, end) ranges."""
        def on_bad(bad: BadSample, n: int) -> None:
            self.note(bad, counts, examples, n)

        for unit, position, where, _, data, captions in parsed_samples(self.source, plan, on_bad):
            try:
                image = self.decoded(data, where)
            except BadSample as bad:
                on_bad(bad, 1)
                continue
            yield image, captions, int(self.offsets[unit]) + position

    def decoded(self, data: bytes, where: str) -> torch.Tensor:
        try:
            return self.transform(decode_image(data, self.decode_size))
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on damaged files
            raise BadSample("bad_image", where, str(err).splitlines()[0]) from None

    def note(self, bad: BadSample, counts: dict[str, int], examples: list[str], n: int = 1) -> None:
        if self.strict and get_worker_info() is None and self.world == 1:
            raise UserError(f"data (strict): {bad}")  # alone: stop here; else every rank stops at the next check
        counts[bad.kind] += n
        if len(examples) < 3:
            examples.append(str(bad))

    def resampled_plan(self, reader: int, epoch: int) -> Iterator[tuple[int, int, int]]:
        rng = np.random.default_rng([self.seed, epoch, reader, 1])
        while True:
            unit = int(rng.integers(len(self.sizes)))
            yield unit, 0, self.sizes[unit]

    def shuffled(self, items: Iterator[Any], reader: int, epoch: int) -> Iterator[Any]:
        """A seeded shuffle buffer: items leave in random order once the buffer is full."""
        if not self.shuffle_buffer:
            yield from items
            return
        rng = np.random.default_rng([self.seed, epoch, reader, 2])
        buffer: list[Any] = []
        for item in items:
            buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(rng.integers(len(buffer))))
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # the epoch and resume point as they are now: the generator body runs later
        return self.generate(self.epoch, self.skip_batches)

    def generate(self, epoch: int, skip_batches: int) -> Iterator[dict[str, Any]]:
        reader, readers = self.readers()
        # the loader takes batches from its workers in turn, starting with worker 0: after
        # `skip_batches`, worker w plays the part worker (w + skip_batches) % workers had
        workers = readers // self.world
        role = (reader % workers + skip_batches) % workers
        reader = reader - reader % workers + role
        if get_worker_info() is not None:  # random crops follow (seed, epoch, reader), whichever process draws them
            torch.manual_seed(int(np.random.default_rng([self.seed, epoch, reader, 4]).integers(2**62)))
        counts = dict.fromkeys(SKIP_KINDS, 0)
        examples: list[str] = []
        plan: Any = self.resampled_plan(reader, epoch) if self.mode == "resampled" else \
            self.slice_plan(reader, readers, epoch)
        samples = self.shuffled(self.read(plan, counts, examples), reader, epoch)
        if not self.train:  # every sample once, the last batch short
            yield from self.batches(samples, counts, examples, reader, epoch, limit=None)
            return
        quota = self.batches_per_reader(readers)
        if self.mode == "epochs":
            samples = self.refilled(samples, plan, counts, examples, quota * self.batch_size)
        # a resumed epoch replays the batches already trained on (same order, same crops), unseen
        done = len(range(role, skip_batches, workers))
        for i, batch in enumerate(self.batches(samples, counts, examples, reader, epoch, limit=quota)):
            if i >= done:
                yield batch

    def refilled(self, samples: Iterator[Any], plan: list[tuple[int, int, int]], counts: dict[str, int],
                 examples: list[str], needed: int) -> Iterator[Any]:
        given = 0
        for item in samples:
            yield item
            given += 1
        while given < needed:  # bad samples left the reader short: take good ones again from its slice
            again = 0
            for item in self.read(plan, dict.fromkeys(SKIP_KINDS, 0), []):
                if given >= needed:
                    return
                counts["repeated"] += 1
                again += 1
                given += 1
                yield item
            if not again:
                raise UserError(f"data: no readable sample in this reader's share of the data ({examples[:1]}).")

    def batches(self, samples: Iterator[tuple[torch.Tensor, list[str], int]], counts: dict[str, int],
                examples: list[str], reader: int, epoch: int, limit: int | None) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` (at most ``limit``; without one the last may be short).
        Each full batch waits for the next sample, so that the last batch carries the counts of
        whatever was skipped after it."""
        chunk: list[tuple[torch.Tensor, list[str], int]] = []
        ready: list[tuple[torch.Tensor, list[str], int]] | None = None
        made = 0
        rng = np.random.default_rng([self.seed, epoch, reader, 3])
        for item in samples:
            if ready is not None:
                yield self.collate(ready, counts, examples, reader, rng)
                ready = None
            chunk.append(item)
            if len(chunk) == self.batch_size:
                ready, chunk, made = chunk, [], made + 1
                if limit is not None and made >= limit:
                    break
        if ready is not None:
            yield self.collate(ready, counts, examples, reader, rng)
        if chunk and limit is None:
            yield self.collate(chunk, counts, examples, reader, rng)

    def collate(self, items: list[tuple[torch.Tensor, list[str], int]], counts: dict[str, int], examples: list[str],
                reader: int, rng: np.random.Generator) -> dict[str, Any]:
        images = torch.stack([image for image, _, _ in items])
        image_id = torch.tensor([sid for _, _, sid in items], dtype=torch.long)
        batch: dict[str, Any] = {"image": images, "image_id": image_id,
                                 "skipped": torch.tensor([counts[k] for k in SKIP_KINDS]), "reader": reader,
                                 "skipped_examples": list(examples)}  # this reader's, this epoch, so far
        if self.train:  # one caption per image, drawn when an image has several
            captions = [caps[int(rng.integers(len(caps)))] for _, caps, _ in items]
            tokens = tokenize(self.tokenizer, captions, self.max_length)
            batch.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                         caption_id=torch.tensor([caption_hash(c) for c in captions]))
            return batch
        flat = [(sid, k, c) for _, caps, sid in items for k, c in enumerate(caps)]
        tokens = tokenize(self.tokenizer, [c for _, _, c in flat], self.max_length)
        batch.update(label=torch.full((len(items),), -1), input_ids=tokens["input_ids"],
                     attention_mask=tokens["attention_mask"],
                     text_image_id=torch.tensor([sid for sid, _, _ in flat]),
                     caption_id=torch.tensor([caption_hash(c) for _, _, c in flat]),
                     text_id=torch.tensor([sid * 64 + k for sid, k, _ in flat]),
                     references=[caps for _, caps, _ in items])
        return batch


class StreamLoader(DataLoader):
    """Sets the stream's epoch (and rank) before the workers start; Lightning keeps its
    ``state_dict`` in checkpoints, so a resumed epoch continues after the batches done."""

    def __init__(self, stream: SampleStream, epoch: Callable[[], int], batches_done: Callable[[], int],
                 num_workers: int) -> None:
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False)
        self.epoch, self.batches_done = epoch, batches_done
        self.restored = False

    def __iter__(self):
        stream: SampleStream = self.dataset  # type: ignore[assignment]
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        stream.world, stream.rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) \
            if distributed else (1, 0)
        if self.restored:  # Lightning makes the resumed iterator before it advances its epoch counter
            self.restored = False
        else:
            stream.epoch, stream.skip_batches = self.epoch(), 0
        iterator = super().__iter__()  # workers (or the generator) took the epoch and resume point
        stream.skip_batches = 0  # only the first epoch after a resume starts part-way
        return iterator

    def __len__(self) -> int:
        stream: SampleStream = self.dataset  # type: ignore[assignment]
        if not stream.train:
            raise TypeError("evaluation streams have no fixed length")
        return stream.batches_per_rank(self.num_workers)

    def state_dict(self) -> dict[str, int]:
        stream: SampleStream = self.dataset  # type: ignore[assignment]
        done = self.batches_done()
        if done >= len(self):
            return {"epoch": stream.epoch + 1, "batches_done": 0}
        return {"epoch": stream.epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        stream: SampleStream = self.dataset  # type: ignore[assignment]
        stream.epoch, stream.skip_batches = state["epoch"], state["batches_done"]
        self.restored = True


class StreamedCaptionData(TaskData):
    """Image-caption pairs from a source per split, for CLIP and captioning recipes (the
    batches carry both layouts). Subclasses say where each split's data is (``specs``, named
    by recipe key in ``spec_keys``) and open it (``open_source``). See the module docstring
    for epochs, resampling and bad samples."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, specs: dict[str, Any],
                 spec_keys: dict[str, str], mode: str = "epochs", samples_per_epoch: int | None = None,
                 batch_size: int = 256, eval_batch_size: int = 256, num_workers: int = 4, shuffle_buffer: int = 1000,
                 max_bad_fraction: float = 0.01, strict: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0),
                 shuffle_seed: int = 0) -> None:
        super().__init__(shuffle_seed)
        if mode not in ("epochs", "resampled"):
            raise UserError(f"data.mode: {mode!r} is not one of epochs, resampled.")
        if mode == "resampled" and not samples_per_epoch:
            raise UserError("data.mode=resampled needs data.samples_per_epoch (the sampling has no end).")
        self.check_loader_options({"batch_size": batch_size, "eval_batch_size": eval_batch_size,
                                   "num_workers": num_workers})
        if not 0 <= max_bad_fraction <= 1:
            raise UserError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.specs, self.spec_keys = specs, spec_keys
        self.mode, self.samples_per_epoch, self.shuffle_buffer = mode, samples_per_epoch, shuffle_buffer
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.max_bad_fraction, self.strict, self.crop_scale = max_bad_fraction, strict, tuple(crop_scale)
        self.streams: dict[str, SampleStream] = {}
        self.skipped: dict[str, dict[int, torch.Tensor]] = {}  # split -> reader -> its latest counts
        self.examples: dict[str, dict[int, list[str]]] = {}  # split -> reader -> a few bad samples named

    def open_source(self, split: str) -> Any:
        """The split's source (see the module docstring); a wrong path fails here, naming its key."""
        raise NotImplementedError

    def stream(self, split: str) -> SampleStream:
        if split not in self.streams:
            if not self.specs[split]:
                raise UserError(f"data.{self.spec_keys[split]} is not set.")
            train = split == "train"
            self.streams[split] = SampleStream(
                self.open_source(split), train, self.batch_size if train else self.eval_batch_size, self.tokenizer,
                self.max_length, self.image_config, self.shuffle_seed, self.mode if train else "epochs",
                self.samples_per_epoch, self.shuffle_buffer, self.strict, self.crop_scale)
        return self.streams[split]

    def setup(self, stage: str | None = None) -> None:
        for split in {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ()):
            if self.specs[split]:
                self.stream(split)

    def train_batches_per_rank(self) -> int:
        batches = self.stream("train").batches_per_rank(self.num_workers)
        if not batches:  # Lightning would only warn, and train nothing
            distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
            world = torch.distributed.get_world_size() if distributed else 1
            raise UserError(f"data.{self.spec_keys['train']}: {self.stream('train').samples_per_epoch_total()} samples per epoch "
                              f"make no full batch of {self.batch_size} for each of {world * max(1, self.num_workers)} "
                              f"readers ({world} rank(s) x {max(1, self.num_workers)} loader worker(s)): lower "
                              f"data.batch_size or data.num_workers.")
        return batches

    def _loader(self, split: str) -> StreamLoader:
        trainer = self.trainer
        epoch = (lambda: trainer.current_epoch) if trainer is not None else (lambda: 0)
        done = (lambda: trainer.fit_loop.epoch_loop.batch_progress.current.processed) if trainer is not None \
            else (lambda: 0)
        return StreamLoader(self.stream(split), epoch, done, self.num_workers)

    def train_dataloader(self) -> StreamLoader:
        self.train_batches_per_rank()  # no full batch is an error, not an empty epoch
        return self._loader("train")

    def val_dataloader(self) -> StreamLoader | list:
        return self._loader("val") if self.specs["val"] else []

    def test_dataloader(self) -> StreamLoader | list:
        return self._loader("test") if self.specs["test"] else []

    # bad-sample accounting (main process) ----------------------------------------------------
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Takes the reader's counts off the batch (before it goes to the device: reading them
        later would cost a host sync per step)."""
        if "skipped" not in batch:
            return batch
        trainer = self.trainer
        split = "train" if trainer is None or trainer.training else ("test" if trainer.testing else "val")
        reader = batch.pop("reader")
        self.skipped.setdefault(split, {})[reader] = batch.pop("skipped")
        self.examples.setdefault(split, {})[reader] = batch.pop("skipped_examples")
        return batch

    def skipped_counts(self, split: str) -> torch.Tensor:
        readers = self.skipped.get(split, {})
        return torch.stack(list(readers.values())).sum(0) if readers else torch.zeros(len(SKIP_KINDS), dtype=torch.long)

    def bad_budget(self) -> float:
        """Bad samples an epoch may hold, over all ranks (strict: none)."""
        return 0.0 if self.strict else self.max_bad_fraction * self.streams["train"].samples_per_epoch_total()

    def too_many_bad(self, split: str, counts: torch.Tensor, bad: int) -> UserError:
        kinds = ", ".join(f"{k} {int(n)}" for k, n in zip(SKIP_KINDS, counts.tolist()) if n)
        examples = [e for per_reader in self.examples.get(split, {}).values() for e in per_reader][:3]
        rule = ("data.strict=true" if self.strict else
                f"more than data.max_bad_fraction={self.max_bad_fraction} of the epoch's "
                f"{self.streams['train'].samples_per_epoch_total()}")
        return UserError(f"data: {bad} bad {split} samples this epoch over all ranks ({kinds}): {rule}; e.g. "
                           f"{'; '.join(examples) or '(on another rank)'}. Raise the fraction, or look with "
                           f"`mml data inspect`.")

    def end_of_epoch(self, split: str) -> dict[str, torch.Tensor]:
        counts = self.skipped_counts(split)
        self.skipped.pop(split, None)
        self.examples.pop(split, None)
        return {kind: n for kind, n in zip(SKIP_KINDS, counts)}

    def callbacks(self) -> list[L.Callback]:
        return [SkippedSamplesLog()]


class SkippedSamplesLog(L.Callback):
    """Checks the bad-sample budget and logs each epoch's counts (``data/<split>_skipped_<kind>``),
    both summed over ranks, so that every rank stops together: a check every
    ``log_every_n_steps`` training batches (every batch under ``data.strict``), one at each
    epoch's end."""

    def _total(self, trainer: L.Trainer, pl_module: L.LightningModule, counts: torch.Tensor) -> torch.Tensor:
        return trainer.strategy.reduce(counts.to(pl_module.device).float(), reduce_op="sum").cpu()

    def _check(self, trainer: L.Trainer, split: str, total: torch.Tensor) -> None:
        datamodule = trainer.datamodule
        bad = int(total[: len(BAD_KINDS)].sum())
        if bad > datamodule.bad_budget():
            raise datamodule.too_many_bad(split, total, bad)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        datamodule = trainer.datamodule
        if datamodule.strict or (batch_idx + 1) % max(1, trainer.log_every_n_steps) == 0:
            self._check(trainer, "train", self._total(trainer, pl_module, datamodule.skipped_counts("train")))

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        datamodule = trainer.datamodule
        local = datamodule.skipped_counts(split)
        total = self._total(trainer, pl_module, local)
        if split != "train" and datamodule.strict and int(total[: len(BAD_KINDS)].sum()):
            raise datamodule.too_many_bad(split, total, int(total[: len(BAD_KINDS)].sum()))
        if split == "train":
            self._check(trainer, split, total)
        datamodule.end_of_epoch(split)
        for kind, value in zip(SKIP_KINDS, total):
            pl_module.log(f"data/{split}_skipped_{kind}", value, rank_zero_only=True)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            trainer.datamodule.end_of_epoch("val")
        else:
            self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")
