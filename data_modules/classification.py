"""Images with one class each, for classifiers and prompt learning (tasks ``classify`` and
``prompt_learning``), and for the zero-shot and probe sections of ``mml eval``.

Four sources, one behaviour:

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8 scans shipped inside the package);
- ``shapes_objects``: one-object scenes of the shapes world, labelled (size, colour, shape);
- ``image_folder``: ``ROOT/<class>/*`` (split per class by a seeded draw) or
  ``ROOT/train|val|test/<class>/*`` (used as given);
- ``image_table``: a table (CSV/TSV, Parquet, ``datasets`` folder) with an image column and a label
  column (and optionally a split column).

Every one of them takes ``shots: k`` (k training images per class, drawn by ``shot_seed``
as ``mml eval``'s few-shot probes draw them), ``class_subset: base | new`` (CoCoOp's
base-to-new protocol: the first half of the classes, or the rest) and ``train_repeats``
(passes over a small training set per epoch). Batches are
``{"image": (B,3,H,W), "label": (B,), "sample_id": (B,)}``; ``zero_shot`` holds the class
names and prompt templates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.base import LabelledImages, ZeroShotSpec
from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.common import SplitDataModule, normalize_uint8
from mmlightning.data_modules.image_folder import IMAGE_SUFFIXES, class_folders, image_files
from mmlightning.data_modules.streams import BadSample, decode_image
from mmlightning.data_modules.tables import image_file, read_bytes, read_rows
from mmlightning.data_modules.transforms import apply_transform, eval_transform, train_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError
from mmlightning.metrics.samples import few_shot_draw
from mmlightning.registry import DATA_MODULES

SPLITS = ("train", "val", "test")
CLASS_SUBSETS = ("all", "base", "new")


@dataclass
class Split:
    """One split before it becomes a dataset: images in memory (uint8 (N,H,W,3) at their own
    size) or image files (paths, or the encoded bytes of a table's image cells), and a label
    per image."""

    labels: np.ndarray
    pixels: torch.Tensor | None = None
    files: list[Path | str | bytes] | None = None

    def subset(self, rows: np.ndarray) -> Split:
        return Split(self.labels[rows], None if self.pixels is None else self.pixels[rows],
                     None if self.files is None else [self.files[i] for i in rows])


class InMemoryImages(Dataset):
    """uint8 images resized as a batch to the encoder's size (no per-sample Python)."""

    def __init__(self, split: Split, image_config: ImageConfig, repeats: int = 1) -> None:
        self.pixels, self.labels = split.pixels, torch.as_tensor(split.labels, dtype=torch.long)
        self.image_config, self.repeats = image_config, repeats

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor([int(i) for i in indices]) % len(self.labels)
        images = self.pixels[idx]
        size = self.image_config.size
        if images.shape[1:3] != (size, size):
            x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                              antialias=images.shape[1] > size, align_corners=False)
            images = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return {"image": normalize_uint8(images, self.image_config), "label": self.labels[idx], "sample_id": idx}


def open_image(file: Path | str | bytes) -> Image.Image:
    """A split's image: encoded bytes, a local path, or an fsspec URL (str)."""
    if isinstance(file, str):
        file = read_bytes(file, file)
    return decode_image(file) if isinstance(file, bytes) else load_image(file)


class FileImages(Dataset):
    """Image files decoded per sample; training crops at random with each sample's own seed."""

    def __init__(self, split: Split, image_config: ImageConfig, train: bool, repeats: int = 1) -> None:
        self.files, self.labels = split.files, torch.as_tensor(split.labels, dtype=torch.long)
        self.transform = train_transform(image_config, scale=(0.5, 1.0)) if train else eval_transform(image_config)
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [int(i) % len(self.labels) for i in indices]
        images = [apply_transform(self.transform, open_image(self.files[r]), i) for r, i in zip(rows, indices)]
        idx = torch.as_tensor(rows)
        return {"image": torch.stack(images), "label": self.labels[idx], "sample_id": idx}


def split_per_class(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Rows of each split, drawn per class (stratified) with a fixed seed: ``fractions`` of
    each class go to the named splits (at least one image each where the class has enough),
    the rest to ``train``."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("train", *fractions)}
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, fraction in fractions.items():
            n = max(1, round(len(rows) * fraction)) if len(rows) > len(fractions) else 0
            out[name].append(rows[start:start + n])
            start += n
        out["train"].append(rows[start:])
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


class ClassificationData(SplitDataModule):
    """What the four sources share (see the module docstring); each subclass reads its
    classes and splits in ``read()``, at construction, so bad data fails before training."""

    drop_last_train = False  # a few-shot training set may be smaller than one batch
    source_key = "data"  # where the source's own errors point

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, batch_size: int = 64,
                 eval_batch_size: int = 256, num_workers: int = 0, shuffle_seed: int = 0,
                 templates: list[str] | tuple[str, ...] = ("a photo of a {}.",), shots: int | None = None,
                 shot_seed: int = 0, class_subset: str = "all", train_repeats: int = 1) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.image_config = image_config
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise UserError(f"data.templates: each prompt template needs exactly one '{{}}' for the class name; got "
                            f"{list(bad or templates)}.")
        if class_subset not in CLASS_SUBSETS:
            raise UserError(f"data.class_subset must be one of {', '.join(CLASS_SUBSETS)}, got {class_subset!r}.")
        if not isinstance(train_repeats, int) or train_repeats < 1:
            raise UserError(f"data.train_repeats must be a whole number >= 1, got {train_repeats!r}.")
        if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
            raise UserError(f"data.shots must be a whole number >= 1 (images per class), or null for all; got {shots!r}.")
        self.train_repeats = train_repeats
        classnames, splits = self.read()
        classnames, splits = self.keep_classes(classnames, splits, class_subset)
        if shots is not None:
            splits["train"] = self.few_shot(splits["train"], classnames, shots, shot_seed)
        self.classnames, self.splits = classnames, splits
        self.zero_shot = ZeroShotSpec(classnames=classnames, templates=list(templates))

    def read(self) -> tuple[list[str], dict[str, Split]]:
        raise NotImplementedError

    @staticmethod
    def keep_classes(classnames: list[str], splits: dict[str, Split], subset: str) -> tuple[list[str], dict[str, Split]]:
        """``base``: the first half of the classes (rounded up), ``new``: the rest, relabelled
        from 0 (CoCoOp's base-to-new split)."""
        if subset == "all":
            return classnames, splits
        half = math.ceil(len(classnames) / 2)
        kept = list(range(half)) if subset == "base" else list(range(half, len(classnames)))
        relabel = np.full(len(classnames), -1)
        relabel[kept] = np.arange(len(kept))
        out = {}
        for name, split in splits.items():
            part = split.subset(np.flatnonzero(np.isin(split.labels, kept)))
            part.labels = relabel[part.labels]
            out[name] = part
        return [classnames[i] for i in kept], out

    @staticmethod
    def few_shot(split: Split, classnames: list[str], k: int, seed: int) -> Split:
        counts = np.bincount(split.labels, minlength=len(classnames))
        smallest = int(counts.argmin())
        if counts[smallest] < k:
            raise UserError(f"data.shots={k}: class {classnames[smallest]!r} has only {counts[smallest]} training "
                            f"images; k can be at most {counts[smallest]} (the smallest class).")
        chosen, _ = few_shot_draw(split.labels, k, seed)
        return split.subset(np.sort(chosen))

    def build_split(self, split: str) -> Dataset:
        return self.dataset(split, train=split == "train")

    def dataset(self, split: str, train: bool) -> Dataset:
        repeats = self.train_repeats if train else 1
        part = self.splits[split]
        if part.pixels is not None:
            return InMemoryImages(part, self.image_config, repeats)
        return FileImages(part, self.image_config, train, repeats)

    def labelled_images(self) -> LabelledImages:
        return LabelledImages(self.name, self.zero_shot, self.dataset("train", train=False),
                              self.dataset("test", train=False))

    @property
    def name(self) -> str:
        return type(self).__name__

    def raw_pixels(self, split: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Each image's pixels at its own size, flattened, in [0, 1] (N, H*W*3), and labels:
        for classic baselines on the same split (the classify task fits an SVM on them).
        None for data decoded from files."""
        part = self.splits[split]
        if part.pixels is None:
            return None
        return part.pixels.reshape(len(part.labels), -1).float().div(255).numpy(), part.labels


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@DATA_MODULES.register("digits")
class DigitsData(ClassificationData):
    """scikit-learn's handwritten digits (``load_digits``: 1,797 real 8x8 scans, 16 grey
    levels, shipped in the package), upsampled to the encoder's size. ``test_fraction`` of
    each class is held out for test, ``val_fraction`` for validation, by a fixed draw."""

    name = "digits"

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, test_fraction: float = 0.2,
                 val_fraction: float = 0.1, split_seed: int = 0,
                 templates: list[str] | tuple[str, ...] = ("a photo of the number {}.",), **kwargs: Any) -> None:
        if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and test_fraction + val_fraction < 1):
            raise UserError(f"data.test_fraction and data.val_fraction must be in (0, 1) with a sum below 1, got "
                            f"{test_fraction} and {val_fraction}.")
        self.fractions, self.split_seed = {"test": test_fraction, "val": val_fraction}, split_seed
        super().__init__(tokenizer, max_length, image_config, templates=templates, **kwargs)

    def read(self) -> tuple[list[str], dict[str, Split]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        grey = torch.from_numpy(digits.images * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)
        pixels = grey[..., None].expand(-1, -1, -1, 3).contiguous()  # (N, 8, 8, 3)
        labels = digits.target.astype(np.int64)
        rows = split_per_class(labels, self.fractions, self.split_seed)
        return DIGIT_NAMES, {name: Split(labels[r], pixels[r]) for name, r in rows.items()}


@DATA_MODULES.register("shapes_objects")
class ShapesObjectsData(ClassificationData):
    """One-object scenes of the shapes world, each labelled with its (size, colour, shape):
    48 classes, rendered at the encoder's size. Every class appears in every split."""

    name = "shapes"

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, num_train: int = 2400,
                 num_val: int = 480, num_test: int = 1200, seed: int = 0,
                 templates: list[str] | tuple[str, ...] = ("a {}",), **kwargs: Any) -> None:
        self.sizes, self.seed = {"train": num_train, "val": num_val, "test": num_test}, seed
        self.size = image_config.size
        super().__init__(tokenizer, max_length, image_config, templates=templates, **kwargs)

    def read(self) -> tuple[list[str], dict[str, Split]]:
        objects = world.all_objects()
        index = {o: k for k, o in enumerate(objects)}
        splits = {}
        for name, n in self.sizes.items():
            rendered = world.generate(name, n, seed=self.seed, image_size=self.size, max_objects=1, heldout=())
            labels = np.array([index[scene[0].combo] for scene in rendered.scenes])
            splits[name] = Split(labels, torch.from_numpy(rendered.images))
        return [world.object_phrase(o) for o in objects], splits


def read_class_folders(folder: Path, key: str) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (the subfolders, ``_`` read as a space), image files and their labels."""
    folders = class_folders(folder)
    names, files, labels = [], [], []
    for label, sub in enumerate(folders):
        found = image_files(sub)
        if not found:
            raise UserError(f"{key}: class folder {str(sub)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
        names.append(sub.name)
        files += found
        labels += [label] * len(found)
    if len(names) < 2:
        raise UserError(f"{key}: {str(folder)!r} needs at least 2 class subfolders, found {names or 'none'}.")
    return names, files, np.array(labels)


@DATA_MODULES.register("image_folder")
class ImageFolderData(ClassificationData):
    """A folder of class-named subfolders: ``root/<class>/*`` (``test_fraction`` and
    ``val_fraction`` of each class drawn by ``split_seed``), or ``root/train/<class>/*`` with
    ``root/val/`` and/or ``root/test/`` beside it (a missing val or test is the other one)."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, root: str = "",
                 test_fraction: float = 0.2, val_fraction: float = 0.1, split_seed: int = 0, **kwargs: Any) -> None:
        self.root, self.fractions, self.split_seed = Path(root), {"test": test_fraction, "val": val_fraction}, split_seed
        super().__init__(tokenizer, max_length, image_config, **kwargs)

    @property
    def name(self) -> str:
        return self.root.name

    def read(self) -> tuple[list[str], dict[str, Split]]:
        if not self.root.is_dir():
            raise UserError(f"data.root: {str(self.root)!r} is not a folder.")
        given = {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        if "train" in given:
            if len(given) < 2:
                raise UserError(f"data.root: {str(self.root)!r} has train/ but neither val/ nor test/ beside it.")
            given.setdefault("val", given.get("test"))
            given.setdefault("test", given["val"])
            read = {s: read_class_folders(folder, "data.root") for s, folder in given.items()}
            names = read["train"][0]
            for s, (other, _, _) in read.items():
                if other != names:
                    raise UserError(f"data.root: {given[s]} has classes {other}, train/ has {names}: they must match.")
            return [n.replace("_", " ") for n in names], {s: Split(labels, files=files)
                                                          for s, (_, files, labels) in read.items()}
        names, files, labels = read_class_folders(self.root, "data.root")
        rows = split_per_class(labels, self.fractions, self.split_seed)
        return [n.replace("_", " ") for n in names], {s: Split(labels[r], files=[files[i] for i in r])
                                                      for s, r in rows.items()}


@DATA_MODULES.register("image_table")
class ImageTableData(ClassificationData):
    """A table with one row per image, in any form ``table_captions`` reads (CSV/TSV, Parquet,
    a ``save_to_disk`` or imagefolder folder, a hub id online): ``image_key`` (bytes, the
    ``datasets`` Image struct, or a path relative to ``image_root``, default the table's folder)
    and ``label_key`` (a class name, or a class index into ``classes``). ``classes`` lists the
    class names in order (default: the labels found, sorted; required for indices); ``split_key`` (values
    train/val/test) or else a stratified draw as for image folders."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, table: str = "",
                 image_key: str = "image", label_key: str = "label", split_key: str | None = None,
                 classes: list[str] | None = None, image_root: str | None = None, sep: str | None = None,
                 test_fraction: float = 0.2, val_fraction: float = 0.1, split_seed: int = 0, **kwargs: Any) -> None:
        if not table:
            raise UserError("data.table: name the table (a .csv/.tsv or .parquet file, a folder of Parquet, a "
                            "save_to_disk or imagefolder folder).")
        self.table, self.image_root, self.sep = table, image_root, sep
        self.keys = {"image_key": image_key, "label_key": label_key, **({"split_key": split_key} if split_key else {})}
        self.classes, self.fractions, self.split_seed = classes, {"test": test_fraction, "val": val_fraction}, split_seed
        super().__init__(tokenizer, max_length, image_config, **kwargs)

    @property
    def name(self) -> str:
        return Path(str(self.table)).stem

    def read(self) -> tuple[list[str], dict[str, Split]]:
        rows, where, roots = read_rows(self.table, "data.table", self.keys, self.sep)
        image_key, label_key, split_key = self.keys["image_key"], self.keys["label_key"], self.keys.get("split_key")
        labels_text = [str(r[label_key]).strip() if r[label_key] is not None else "" for r in rows]
        found = sorted(set(labels_text))
        if not self.classes and found and all(c.isdigit() for c in found):
            raise UserError(f"data.classes: the labels of {self.table} ({label_key!r}) are class indices "
                            f"({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}); list the class names in "
                            f"index order, e.g. data.classes=[cat, dog].")
        classes = list(self.classes) if self.classes else found
        index = {c: i for i, c in enumerate(classes)}
        by_index = bool(self.classes) and all(c.isdigit() for c in found) and not set(found) & set(classes)
        if by_index:  # labels are indices into data.classes
            index = {str(i): i for i in range(len(classes))}
        images: list[Path | str | bytes] = []
        for row, label, at, root in zip(rows, labels_text, where, roots):
            if label not in index:
                what = (f"class index {label} is outside data.classes ({len(classes)} classes)" if by_index else
                        f"label {label!r} is not one of data.classes ({', '.join(classes)})")
                raise UserError(f"data.label_key: {at}: {what}.")
            try:  # paths stay paths (checked here, read per batch); bytes stay in memory
                image = image_file(row[image_key], at, image_key, self.image_root or root)
            except BadSample as bad:
                raise UserError(f"data.image_key: {bad}") from None
            if isinstance(image, str) and "://" not in image:
                if not Path(image).is_file():
                    raise UserError(f"data.image_key: {at}: image {image!r} does not exist.")
                image = Path(image)
            images.append(image)
            if split_key and row[split_key] not in SPLITS:
                raise UserError(f"data.split_key: {at}: split {row[split_key]!r} is not one of {', '.join(SPLITS)}.")
        labels = np.array([index[label] for label in labels_text], dtype=np.int64)
        if split_key:
            chosen = {s: np.array([i for i, r in enumerate(rows) if r[split_key] == s], dtype=np.int64) for s in SPLITS}
            if not len(chosen["train"]):
                raise UserError(f"data.table: no row of {self.table} has {split_key}=train.")
            for s, other in (("val", "test"), ("test", "val")):
                if not len(chosen[s]):
                    chosen[s] = chosen[other]
        else:
            chosen = split_per_class(labels, self.fractions, self.split_seed)
        return classes, {s: Split(labels[r], files=[images[i] for i in r]) for s, r in chosen.items()}
