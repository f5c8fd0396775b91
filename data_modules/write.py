"""``mml data``: write datasets in the formats the data modules read, and inspect shard sets.

- webdataset shards (``shard-000000.tar`` ..., ``sizes.json``) from the shapes world or any
  COCO-captions dataset (images copied byte for byte);
- COCO-captions JSON (``annotations/captions_<split>.json`` + ``<split>/<id:012d>.jpg``) and
  VQAv2 JSON (questions + annotations with 10 answers + ``COCO_<subtype>_<id:012d>.jpg``)
  from the shapes world.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.coco import read_coco_captions
from mmlightning.data_modules.common import IMAGE_EXTENSIONS
from mmlightning.data_modules.shards import SIZES_FILE, expand_shards, sample_captions, shard_samples
from mmlightning.errors import UserError


@dataclass
class Pair:
    key: str
    image: bytes
    ext: str
    captions: list[str]
    image_id: int


def encode(array: Any, ext: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG" if ext == "jpg" else ext.upper(), **({"quality": 95} if ext == "jpg" else {}))
    return buffer.getvalue()


def shapes_pairs(split: str, num: int, seed: int, image_size: int, ext: str) -> Iterator[Pair]:
    rendered = world.generate(split, num, seed=seed, image_size=image_size)
    for i, (image, captions) in enumerate(zip(rendered.images, rendered.captions)):
        yield Pair(f"{split}-{i:08d}", encode(image, ext), ext, list(captions), i)


def coco_pairs(json_path: str | Path, image_root: str | Path) -> Iterator[Pair]:
    paths, captions = read_coco_captions(json_path, image_root)
    for i, (path, caps) in enumerate(zip(paths, captions)):
        ext = path.suffix.lower().lstrip(".")
        if ext not in IMAGE_EXTENSIONS:
            raise UserError(f"{json_path}: {path.name} is not a {'/'.join(IMAGE_EXTENSIONS)} image.")
        # keys by position: a file stem with a dot in it would split webdataset's key/extension
        yield Pair(f"{i:08d}", path.read_bytes(), "jpg" if ext == "jpeg" else ext, caps, i)


def write_shards(pairs: Iterator[Pair], out: str | Path, shard_size: int) -> dict[str, Any]:
    """Tar shards of ``shard_size`` samples: ``<key>.<ext>`` (image bytes), ``<key>.txt``
    (the first caption) and ``<key>.json`` (all captions, the image id); and ``sizes.json``."""
    import webdataset as wds

    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise UserError(f"{out} already holds shards; not mixing two datasets. Pick an empty folder.")
    sizes: dict[str, int] = {}
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=shard_size, verbose=0) as writer:
        for pair in pairs:
            writer.write({"__key__": pair.key, pair.ext: pair.image, "txt": pair.captions[0],
                          "json": {"captions": pair.captions, "image_id": pair.image_id}})
            name = Path(writer.fname).name
            sizes[name] = sizes.get(name, 0) + 1
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=1))
    return {"samples": sum(sizes.values()), "shards": len(sizes),
            "bytes": sum((out / name).stat().st_size for name in sizes), "folder": str(out)}


def write_coco(split: str, num: int, seed: int, image_size: int, out: str | Path) -> dict[str, Any]:
    """The shapes world as a COCO-captions dataset (what the ``coco_captions`` data module reads)."""
    out = Path(out)
    folder = out / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for pair in shapes_pairs(split, num, seed, image_size, "jpg"):
        name = f"{pair.image_id:012d}.jpg"
        (folder / name).write_bytes(pair.image)
        images.append({"id": pair.image_id, "file_name": name, "height": image_size, "width": image_size})
        annotations += [{"id": len(annotations) + 1, "image_id": pair.image_id, "caption": c} for c in pair.captions]
    target = out / "annotations" / f"captions_{split}2017.json"
    target.write_text(json.dumps({"info": {"description": f"shapes world, {split} split"}, "licenses": [],
                                  "images": images, "annotations": annotations}))
    return {"samples": len(images), "captions": len(annotations), "json": str(target), "images": str(folder),
            "bytes": sum(p.stat().st_size for p in folder.iterdir()) + target.stat().st_size}


ANSWER_TYPES = {"count": "number", "exist": "yes/no"}


def write_vqav2(split: str, num: int, seed: int, image_size: int, out: str | Path) -> dict[str, Any]:
    """Shapes-world questions as VQAv2 files (what the ``vqav2`` data module reads); each
    question's 10 annotator answers are its one true answer."""
    subtype = f"{split}2014"
    out = Path(out)
    folder = out / subtype
    folder.mkdir(parents=True, exist_ok=True)
    rendered = world.generate(split, num, seed=seed, image_size=image_size, with_questions=True)
    questions, annotations = [], []
    for image_id, (image, asked) in enumerate(zip(rendered.images, rendered.questions)):
        (folder / f"COCO_{subtype}_{image_id:012d}.jpg").write_bytes(encode(image, "jpg"))
        for j, q in enumerate(asked):
            question_id = image_id * 100 + j
            questions.append({"image_id": image_id, "question": q.question + "?", "question_id": question_id})
            answer_type = "yes/no" if q.answer in ("yes", "no") else ANSWER_TYPES.get(q.family, "other")
            annotations.append({"question_id": question_id, "image_id": image_id, "question_type": q.family,
                                "answer_type": answer_type, "multiple_choice_answer": q.answer,
                                "answers": [{"answer": q.answer, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k in range(10)]})
    common = {"info": {"description": f"shapes world, {split} split"}, "license": {}, "data_subtype": subtype}
    q_path = out / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    a_path = out / f"v2_mscoco_{subtype}_annotations.json"
    q_path.write_text(json.dumps({**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions}))
    a_path.write_text(json.dumps({**common, "data_type": "mscoco", "annotations": annotations}))
    return {"samples": len(questions), "images": num, "questions": str(q_path), "annotations": str(a_path),
            "bytes": sum(p.stat().st_size for p in folder.iterdir()) + q_path.stat().st_size + a_path.stat().st_size}


def inspect_shards(spec: str, show: int = 3) -> dict[str, Any]:
    """Count the samples of a shard set (reading every tar), list the file kinds a sample
    holds and the first few captions; damaged shards and bad or missing captions are
    reported, not fatal (images are not decoded here)."""
    import tarfile

    urls = expand_shards(spec, "mml data inspect")
    samples, kinds, captions, problems, total_bytes = 0, set(), [], [], 0
    for url in urls:
        if "://" not in url:
            total_bytes += Path(url).stat().st_size
        try:
            for sample in shard_samples(url):
                samples += 1
                kinds |= {k for k in sample if not k.startswith("__")}
                where = f"{url} key {sample['__key__']!r}"
                try:
                    caps = sample_captions(sample, where)
                    if len(captions) < show:
                        captions.append(f"{sample['__key__']}: {caps[0]}")
                except Exception as err:  # noqa: BLE001  (reported, inspection goes on)
                    problems.append(str(err))
        except (tarfile.TarError, OSError, EOFError) as err:
            problems.append(f"{url}: {type(err).__name__}: {err}")
    return {"shards": len(urls), "samples": samples, "bytes": total_bytes, "sample_keys": sorted(kinds),
            "captions": captions, "problems": problems}
