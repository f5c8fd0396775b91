"""What data modules share: the batch layout tasks read, tokenizing and image normalisation.

Training batches hold one caption per image:
    image (B,3,H,W) float, input_ids/attention_mask (B,T), image_id (B,), caption_id (B,)
Evaluation batches hold each image once with all its captions, so retrieval can count an
image as found through any of them:
    image (B,3,H,W), image_id (B,), label (B,) zero-shot class or -1,
    input_ids/attention_mask (M,T), text_image_id (M,), caption_id (M,), text_id (M,)
``caption_id`` numbers distinct caption strings within a split (identical strings share one),
``text_id`` numbers captions, so duplicates added by a distributed sampler can be dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mmlightning.data_modules.base import TaskData
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError


class TensorImages(Dataset):
    """Labelled images held in memory as uint8 (N,H,W,3)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, image_config: ImageConfig) -> None:
        self.images, self.labels, self.image_config = images, labels, image_config

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {"image": normalize_uint8(self.images[idx], self.image_config), "label": self.labels[idx]}


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")  # what image folders and shards hold


def normalize_uint8(images: torch.Tensor, config: ImageConfig) -> torch.Tensor:
    """(B,H,W,3) uint8 -> (B,3,H,W) float normalised with the encoder's mean and std."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(config.mean).view(1, 3, 1, 1)
    std = torch.tensor(config.std).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous()


def string_ids(strings: list[str]) -> torch.Tensor:
    """Number distinct strings: identical captions get identical ids."""
    table: dict[str, int] = {}
    return torch.tensor([table.setdefault(s, len(table)) for s in strings], dtype=torch.long)


def already_batched(batch: Any) -> Any:
    """collate_fn for datasets that build whole batches in ``__getitems__``."""
    return batch


class SampleIndex(int):
    """A training index that carries its sample's seed for random augmentation (see
    ``transforms.apply_transform``); everywhere else it is the plain int it equals."""

    seed: int

    def __new__(cls, index: int, seed: int) -> SampleIndex:
        value = super().__new__(cls, index)
        value.seed = seed
        return value

    def __reduce__(self) -> tuple[Any, ...]:  # to loader workers, seed included
        return SampleIndex, (int(self), self.seed)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled from ``seed`` and the epoch, each rank its share) that
    can start an epoch part-way: after a mid-epoch resume it skips the samples the
    interrupted run had already trained on, in the same order. A DistributedSampler even on
    one process, so that Lightning keeps it instead of swapping in its own under DDP."""

    def __init__(self, dataset: Dataset, seed: int, drop_last: bool) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world, rank = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a new epoch starts from its beginning
        super().set_epoch(epoch)

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        if getattr(self.dataset, "epoch_aware", False):
            # a dataset whose items change with the epoch (a curriculum) reads the epoch from
            # the index, epoch * len + i: loader workers hold copies of the dataset that state
            # set on it later would not reach, and a resumed run replays the same items
            offset = self.epoch * len(self.dataset)
            indices = [offset + i for i in indices]
        # hash() of a tuple of ints is the same in every process (only str hashing is salted)
        return iter(SampleIndex(i, hash((self.seed, self.epoch, i)) & 0x7FFF_FFFF_FFFF_FFFF) for i in indices)


class ResumableLoader(DataLoader):
    """A training DataLoader Lightning treats as stateful: ``state_dict()`` goes into every
    checkpoint and ``load_state_dict()`` runs before the resumed epoch starts. The position
    is the fit loop's count of finished batches, not the batches this loader handed out:
    Lightning fetches one batch ahead."""

    def __init__(self, *args: Any, batches_done: Callable[[], tuple[int, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        done, epoch_length = self.batches_done()
        if done >= epoch_length:  # saved on the epoch's last batch: resume at the next epoch's start
            return {"epoch": self.sampler.epoch + 1, "batches_done": 0}
        return {"epoch": self.sampler.epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches_done"] * self.batch_size


SPLITS_FOR_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class SplitDataModule(TaskData):
    """What every data module here shares: one dataset per split, built on first use by
    ``build_split(split)``, and loaders that shuffle the training split only (dropping its
    last short batch when ``drop_last_train``: contrastive losses want full batches)."""

    drop_last_train = True

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int, shuffle_seed: int = 0) -> None:
        super().__init__(shuffle_seed)
        self.check_loader_options({"batch_size": batch_size, "eval_batch_size": eval_batch_size,
                                   "num_workers": num_workers})
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.datasets: dict[str, Dataset] = {}

    def build_split(self, split: str) -> Dataset:
        raise NotImplementedError

    def collate_fn(self, split: str) -> Callable[[Any], Any]:
        """Default: datasets that cut whole batches in ``__getitems__``."""
        return already_batched

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS_FOR_STAGE.get(stage or "", ("train", "val", "test")):
            if split not in self.datasets:
                self.datasets[split] = self.build_split(split)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle,
                          drop_last=shuffle and self.drop_last_train, collate_fn=self.collate_fn(split),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from the run's seed, split across ranks, and resumable mid-epoch:
        Lightning saves its position in checkpoints (see ``ResumableLoader``)."""
        sampler = ResumableSampler(self.datasets["train"], seed=self.shuffle_seed, drop_last=self.drop_last_train)
        # the loader's own generator: creating its iterator draws the workers' base seed, which
        # would otherwise come from (and shift) the process's stream that dropout draws from
        return ResumableLoader(self.datasets["train"], batch_size=self.batch_size, sampler=sampler,
                               drop_last=self.drop_last_train, collate_fn=self.collate_fn("train"),
                               num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                               generator=torch.Generator().manual_seed(self.shuffle_seed),
                               batches_done=self._batches_done_this_epoch)

    def train_batches_per_rank(self) -> int:
        """Batches of one training epoch on this rank, without building a loader."""
        per_rank = len(ResumableSampler(self.datasets["train"], seed=0, drop_last=self.drop_last_train))
        return per_rank // self.batch_size if self.drop_last_train else math.ceil(per_rank / self.batch_size)

    def _batches_done_this_epoch(self) -> tuple[int, int]:
        """Training batches the fit loop has finished in this epoch, and how many the epoch
        has (after ``limit_train_batches``); (0, 1) outside fit."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.num_training_batches

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)


def read_json_with_images(json_path: str | Path, image_root: str | Path, what: str) -> tuple[Any, Path, Path]:
    """Parse an annotation file that names images under ``image_root``; a missing file or
    folder, or bad JSON, is an error naming it. ``what`` says what the file is
    ("COCO captions file")."""
    json_path, image_root = Path(json_path), Path(image_root)
    if not json_path.is_file():
        raise UserError(f"{what} {str(json_path)!r} does not exist.")
    if not image_root.is_dir():
        raise UserError(f"image folder {str(image_root)!r} does not exist.")
    try:
        return json.loads(json_path.read_text()), json_path, image_root
    except json.JSONDecodeError as err:
        raise UserError(f"{json_path}: not valid JSON ({err}).") from None
