"""COCO-captions data: the official ``captions_*.json`` layout (``images`` with ``id`` and
``file_name``, ``annotations`` with ``image_id`` and ``caption``) and an image folder.

Training sees every caption once per epoch; evaluation sees every image once with all its
captions (5 for COCO), so retrieval follows the standard protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmlightning.data_modules.common import SplitDataModule, read_json_with_images, string_ids
from mmlightning.data_modules.transforms import apply_transform, eval_transform, train_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES


def read_coco_captions(json_path: str | Path, image_root: str | Path) -> tuple[list[Path], list[list[str]]]:
    """Image paths and their captions, in the file's image order. Every problem names the
    file and the entry."""
    data, json_path, image_root = read_json_with_images(json_path, image_root, "COCO captions file")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise UserError(f"{json_path}: expected a top-level list {key!r} (COCO captions layout).")
    captions: dict[Any, list[str]] = {}
    paths: dict[Any, Path] = {}
    for i, img in enumerate(data["images"]):
        if "id" not in img or "file_name" not in img:
            raise UserError(f"{json_path}: images[{i}] needs 'id' and 'file_name', has {sorted(img)}.")
        paths[img["id"]] = image_root / img["file_name"]
        captions[img["id"]] = []
    for i, ann in enumerate(data["annotations"]):
        if "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise UserError(f"{json_path}: annotations[{i}] needs 'image_id' and a string 'caption'.")
        if ann["image_id"] not in captions:
            raise UserError(f"{json_path}: annotations[{i}] refers to image_id {ann['image_id']!r}, not in 'images'.")
        captions[ann["image_id"]].append(ann["caption"].strip())
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"{json_path}: {len(missing)} image file(s) missing under {image_root}, e.g. {missing[0]}.")
    ids = [i for i in paths if captions[i]]
    return [paths[i] for i in ids], [captions[i] for i in ids]


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except OSError as err:
        raise UserError(f"cannot decode image {path}: {err}") from None


class CaptionPairs(Dataset):
    def __init__(self, paths: list[Path], captions: list[list[str]], transform: Any) -> None:
        self.items = [(i, c) for i, caps in enumerate(captions) for c in caps]
        self.caption_id = string_ids([c for _, c in self.items])
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, int, int]:
        image_index, caption = self.items[index]
        return apply_transform(self.transform, load_image(self.paths[image_index]), index), caption, image_index, int(self.caption_id[index])


class CaptionedImages(Dataset):
    def __init__(self, paths: list[Path], captions: list[list[str]], transform: Any) -> None:
        self.paths, self.captions, self.transform = paths, captions, transform
        flat = [c for caps in captions for c in caps]
        self.caption_id = string_ids(flat)
        self.first_text = torch.tensor([0] + [len(c) for c in captions]).cumsum(0)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[str], int, torch.Tensor, torch.Tensor]:
        text_ids = torch.arange(int(self.first_text[index]), int(self.first_text[index + 1]))
        return (self.transform(load_image(self.paths[index])), self.captions[index], index,
                self.caption_id[text_ids], text_ids)


class Collate:
    """Stacks images and tokenizes captions in the loader workers, off the training loop."""

    def __init__(self, tokenizer: Any, max_length: int, evaluation: bool) -> None:
        self.tokenizer, self.max_length, self.evaluation = tokenizer, max_length, evaluation

    def __call__(self, items: list[tuple]) -> dict[str, torch.Tensor]:
        if not self.evaluation:
            images, texts, image_ids, caption_ids = zip(*items)
            return {"image": torch.stack(images), **tokenize(self.tokenizer, list(texts), self.max_length),
                    "image_id": torch.tensor(image_ids), "caption_id": torch.tensor(caption_ids)}
        images, texts, image_ids, caption_ids, text_ids = zip(*items)
        flat = [t for caps in texts for t in caps]
        return {"image": torch.stack(images), "image_id": torch.tensor(image_ids),
                "label": torch.full((len(images),), -1), **tokenize(self.tokenizer, flat, self.max_length),
                "text_image_id": torch.tensor([i for i, caps in zip(image_ids, texts) for _ in caps]),
                "caption_id": torch.cat(caption_ids), "text_id": torch.cat(text_ids)}


@DATA_MODULES.register("coco_captions")
class CocoCaptionsData(SplitDataModule):
    """COCO-format image-caption data (COCO, Flickr30k converted, your own)."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_json: str, train_images: str,
                 val_json: str, val_images: str, test_json: str | None = None, test_images: str | None = None,
                 batch_size: int = 128, eval_batch_size: int = 128, num_workers: int = 4,
                 crop_scale: tuple[float, float] = (0.9, 1.0), shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.files = {"train": (train_json, train_images), "val": (val_json, val_images),
                      "test": (test_json or val_json, test_images or val_images)}
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.crop_scale = tuple(crop_scale)

    def build_split(self, split: str) -> Dataset:
        paths, captions = read_coco_captions(*self.files[split])
        if split == "train":
            return CaptionPairs(paths, captions, train_transform(self.image_config, self.crop_scale))
        return CaptionedImages(paths, captions, eval_transform(self.image_config))

    def collate_fn(self, split: str) -> Collate:
        return Collate(self.tokenizer, self.max_length, evaluation=split != "train")
