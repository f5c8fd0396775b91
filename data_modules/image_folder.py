"""Any folder of class-named subfolders of images, for zero-shot classification and linear
probes (``mml eval ... --image-folder DIR``). Two layouts:

    DIR/<class>/*.jpg                         split per class into train/test by a seeded draw
    DIR/train/<class>/, DIR/test/<class>/     (or val/ for test) used as given

Class names are the folder names with ``_`` read as a space ("golden_retriever").
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules.base import LabelledImages, ZeroShotSpec
from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.common import IMAGE_EXTENSIONS
from mmlightning.data_modules.transforms import eval_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError

IMAGE_SUFFIXES = {f".{ext}" for ext in IMAGE_EXTENSIONS}


class ImageFiles(Dataset):
    def __init__(self, files: list[tuple[Path, int]], image_config: ImageConfig) -> None:
        self.files, self.transform = files, eval_transform(image_config)

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        chosen = [self.files[i] for i in indices]
        return {"image": torch.stack([self.transform(load_image(path)) for path, _ in chosen]),
                "label": torch.tensor([label for _, label in chosen])}


def image_files(folder: Path) -> list[Path]:
    """Every image under ``folder``, recursively, in a fixed order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def decodes(path: Path) -> bool:
    """Whether PIL reads the file as an image (its header and structure, without decoding all pixels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def class_folders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_image_folder(root: str | Path, image_config: ImageConfig, templates: list[str], test_fraction: float = 0.5,
                      seed: int = 0) -> LabelledImages:
    """Every image under ``root`` with its class; errors name the folder and what is wrong.
    Files that do not decode are left out and listed in ``skipped`` (the report says so)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--image-folder {str(root)!r} is not a folder.")
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise UserError(f"prompt templates need exactly one '{{}}' for the class name; got {bad or templates}.")
    given = {name: root / name for name in ("train", "test", "val") if (root / name).is_dir()}
    if "train" in given and ("test" in given or "val" in given):
        splits = {"train": given["train"], "test": given.get("test", given.get("val"))}
        names = sorted({d.name for s in splits.values() for d in class_folders(s)})
        files = {split: [(path, names.index(d.name)) for d in class_folders(folder) for path in image_files(d)]
                 for split, folder in splits.items()}
    else:
        if not 0 < test_fraction < 1:
            raise UserError(f"test_fraction must be between 0 and 1, got {test_fraction}.")
        folders = class_folders(root)
        names = [d.name for d in folders]
        files = {"train": [], "test": []}
        draw = random.Random(seed)
        for label, d in enumerate(folders):
            paths = image_files(d)
            draw.shuffle(paths)
            n_test = max(1, round(len(paths) * test_fraction)) if len(paths) > 1 else 0
            files["test"] += [(p, label) for p in paths[:n_test]]
            files["train"] += [(p, label) for p in paths[n_test:]]
    skipped = sorted(str(path) for items in files.values() for path, _ in items if not decodes(path))
    files = {split: [(path, label) for path, label in items if str(path) not in skipped] for split, items in files.items()}
    if len(names) < 2:
        raise UserError(f"--image-folder {str(root)!r}: needs at least 2 class subfolders, found "
                          f"{[n for n in names] or 'none'}.")
    for split, items in files.items():
        if not items:
            raise UserError(f"--image-folder {str(root)!r}: no {'/'.join(sorted(IMAGE_SUFFIXES))} images for the "
                              f"{split} split.")
    classes = ZeroShotSpec(classnames=[n.replace("_", " ") for n in names], templates=list(templates))
    return LabelledImages(root.name, classes, ImageFiles(files["train"], image_config),
                          ImageFiles(files["test"], image_config), skipped)
