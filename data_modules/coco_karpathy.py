"""COCO captions in the Karpathy split layout (``dataset_coco.json``), the split captioning
papers report on: 113k training images ('train' + 'restval'), 5k 'val', 5k 'test'.

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train"|"restval"|"val"|"test", "cocoid": 391895,
                 "sentences": [{"raw": "A man riding ...", "tokens": [...]}, ...]}, ...]}

Images are read from ``image_root/filepath/filename``. Karpathy's Flickr8k/30k files (no
``filepath``, no ``cocoid``) work too: the image is ``image_root/filename``, its id ``imgid``.

Batches for captioning:
    train: one item per caption, every caption once per epoch:
        image (B,3,H,W), input_ids/attention_mask (B,T) the caption, image_id (B,) long
    val/test: one item per image:
        image (B,3,H,W), image_id (B,) long (the cocoid), references list[list[str]] raw captions
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.common import SplitDataModule, read_json_with_images
from mmlightning.data_modules.transforms import apply_transform, eval_transform, train_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass
class KarpathyImage:
    path: Path
    image_id: int
    captions: list[str]


def read_karpathy(json_path: str | Path, image_root: str | Path) -> dict[str, list[KarpathyImage]]:
    """The images of each Karpathy split, in file order. Every problem names the file and the
    entry. Image files are not touched here (see ``check_images``)."""
    data, json_path, image_root = read_json_with_images(json_path, image_root, "Karpathy split file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UserError(f"{json_path}: expected a top-level list 'images' (Karpathy dataset_coco.json layout).")
    splits: dict[str, list[KarpathyImage]] = {s: [] for s in KARPATHY_SPLITS}
    seen: dict[int, int] = {}
    for i, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where} is a {type(entry).__name__}, not an object.")
        image_id = entry.get("cocoid", entry.get("imgid"))
        missing = [k for k in ("filename", "split", "sentences") if k not in entry]
        missing += ["cocoid"] if image_id is None else []
        if missing:
            raise UserError(f"{where} ({entry.get('filename', 'no filename')}) has no {', '.join(map(repr, missing))}; "
                              f"every entry needs 'filename', 'split', 'sentences' and 'cocoid' (or 'imgid').")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise UserError(f"{where}: the image id ('cocoid' or 'imgid') must be an integer, got {image_id!r}.")
        if entry["split"] not in splits:
            raise UserError(f"{where} has split {entry['split']!r}; valid: {', '.join(KARPATHY_SPLITS)}.")
        if not isinstance(entry["sentences"], list):
            raise UserError(f"{where}: 'sentences' must be a list, got {type(entry['sentences']).__name__}.")
        captions = []
        for j, sentence in enumerate(entry["sentences"]):
            if not isinstance(sentence, dict) or not isinstance(sentence.get("raw"), str):
                raise UserError(f"{where}.sentences[{j}] needs a string 'raw'.")
            captions.append(sentence["raw"].strip())
        if image_id in seen:  # evaluation de-duplicates by id, so ids must be unique
            raise UserError(f"{where} repeats image id {image_id} of images[{seen[image_id]}].")
        seen[image_id] = i
        path = image_root / entry.get("filepath", "") / entry["filename"]
        splits[entry["split"]].append(KarpathyImage(path, image_id, captions))
    return splits


def check_images(json_path: str | Path, image_root: str | Path, images: list[KarpathyImage]) -> None:
    missing = [str(img.path) for img in images if not img.path.is_file()]
    if missing:
        raise UserError(f"{json_path}: {len(missing)} image file(s) missing under {image_root}, e.g. {missing[0]}.")


class CaptionItems(Dataset):
    """Training items: one per caption. Captions are tokenized once, here, and kept unpadded
    (flat ids + offsets): ~600k COCO captions padded to max_length would take ~0.7 GB."""

    def __init__(self, images: list[KarpathyImage], tokenizer: Any, max_length: int, transform: Any,
                 chunk: int = 4096) -> None:
        self.images, self.transform = images, transform
        captions = [c for img in images for c in img.captions]
        self.owner = torch.tensor([i for i, img in enumerate(images) for _ in img.captions], dtype=torch.long)
        ids, lengths = [], []
        for start in range(0, len(captions), chunk):
            out = tokenize(tokenizer, captions[start:start + chunk], max_length)
            real = out["attention_mask"].bool()
            ids.append(out["input_ids"][real].to(torch.int32))
            lengths.append(real.sum(1))
        self.ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lengths).cumsum(0)]) if lengths \
            else torch.zeros(1, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image = self.images[int(self.owner[index])]
        tokens = self.ids[self.offsets[index]:self.offsets[index + 1]]
        return apply_transform(self.transform, load_image(image.path), index), tokens, image.image_id


class ImageItems(Dataset):
    """Evaluation items: each image once, with all its reference captions."""

    def __init__(self, images: list[KarpathyImage], transform: Any) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, list[str]]:
        image = self.images[index]
        return self.transform(load_image(image.path)), image.image_id, image.captions


class CaptionCollate:
    """Stacks images; pads captions back the way the tokenizer pads (its pad id and side);
    keeps references as a list of lists, which the default collate would transpose."""

    def __init__(self, tokenizer: Any, evaluation: bool) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_left = getattr(tokenizer, "padding_side", "right") == "left"
        self.evaluation = evaluation

    def __call__(self, items: list[tuple]) -> dict[str, Any]:
        if self.evaluation:
            images, image_ids, references = zip(*items)
            return {"image": torch.stack(images), "image_id": torch.tensor(image_ids, dtype=torch.long),
                    "references": [list(r) for r in references]}
        images, tokens, image_ids = zip(*items)
        width = max(len(t) for t in tokens)
        input_ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for row, t in enumerate(tokens):
            cols = slice(width - len(t), width) if self.pad_left else slice(0, len(t))
            input_ids[row, cols] = t
            attention_mask[row, cols] = 1
        return {"image": torch.stack(images), "input_ids": input_ids, "attention_mask": attention_mask,
                "image_id": torch.tensor(image_ids, dtype=torch.long)}


@DATA_MODULES.register("coco_karpathy")
class CocoKarpathyData(SplitDataModule):
    """COCO (or Flickr) captions with Karpathy's train/val/test split, for captioning."""

    drop_last_train = False  # a captioning loss is per caption: a short last batch is harmless

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, json_path: str, image_root: str,
                 train_splits: tuple[str, ...] | list[str] = ("train", "restval"), batch_size: int = 64,
                 eval_batch_size: int = 64, num_workers: int = 0,
                 crop_scale: tuple[float, float] = (0.9, 1.0), shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        train_splits = (train_splits,) if isinstance(train_splits, str) else tuple(train_splits)
        unknown = [s for s in train_splits if s not in KARPATHY_SPLITS]
        if unknown or not train_splits:
            raise UserError(f"data.train_splits: {list(train_splits)} is not a non-empty list of Karpathy splits; "
                              f"valid: {', '.join(KARPATHY_SPLITS)}.")
        self.json_path, self.image_root, self.train_splits = json_path, image_root, train_splits
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.crop_scale = tuple(crop_scale)
        self._splits: dict[str, list[KarpathyImage]] | None = None  # the parsed file, read once

    def images(self, split: str) -> list[KarpathyImage]:
        """Images of 'train' (all of ``train_splits``), 'val' or 'test', with captions."""
        if self._splits is None:
            self._splits = read_karpathy(self.json_path, self.image_root)
        wanted = self.train_splits if split == "train" else (split,)
        images = [img for s in wanted for img in self._splits[s] if img.captions]
        if not images:
            raise UserError(f"{self.json_path}: no captioned images with split {' or '.join(map(repr, wanted))}.")
        check_images(self.json_path, self.image_root, images)
        return images

    def build_split(self, split: str) -> Dataset:
        if split == "train":
            return CaptionItems(self.images(split), self.tokenizer, self.max_length,
                                train_transform(self.image_config, self.crop_scale))
        return ImageItems(self.images(split), eval_transform(self.image_config))

    def collate_fn(self, split: str) -> CaptionCollate:
        return CaptionCollate(self.tokenizer, evaluation=split != "train")
