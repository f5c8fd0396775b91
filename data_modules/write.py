"""``mml data``: write datasets in the formats the data modules read, convert between them,
and inspect any of them.

- webdataset shards (``shard-000000.tar`` ..., ``sizes.json``), Parquet (``part-000000.parquet``,
  one row group of ``--shard-size`` rows each, ``datasets``' Image feature), CSV
  (``captions.csv`` + ``images/``, one row per caption) and COCO-captions JSON
  (``annotations/captions_<split>2017.json`` + ``<split>2017/<id:012d>.<ext>``), from the shapes world
  or from any readable input (shards, a table, COCO JSON), images copied byte for byte;
- VQAv2 JSON (questions + annotations with 10 answers + ``COCO_<subtype>_<id:012d>.jpg``)
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
from mmlightning.data_modules.shards import SIZES_FILE, ShardSource, expand_shards
from mmlightning.data_modules.streams import SKIP_KINDS, BadSample, parsed_samples
from mmlightning.data_modules.tables import LOCAL_FORMS, open_table, table_kind
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


def write_coco(pairs: Iterator[Pair], out: str | Path, split: str) -> dict[str, Any]:
    """A COCO-captions dataset (what the ``coco_captions`` data module reads); image ids are
    the pairs' positions."""
    out = Path(out)
    folder = out / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id, pair in enumerate(pairs):
        name = f"{image_id:012d}.{pair.ext}"
        (folder / name).write_bytes(pair.image)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "caption": c} for c in pair.captions]
    target = out / "annotations" / f"captions_{split}2017.json"
    target.write_text(json.dumps({"info": {"description": f"{split} split"}, "licenses": [],
                                  "images": images, "annotations": annotations}))
    return {"samples": len(images), "captions": len(annotations), "json": str(target), "images": str(folder),
            "bytes": sum(p.stat().st_size for p in folder.iterdir()) + target.stat().st_size}


def fresh_folder(out: str | Path, pattern: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(pattern)):
        raise UserError(f"{out} already holds {pattern} files; not mixing two datasets. Pick an empty folder.")
    return out


def write_parquet(pairs: Iterator[Pair], out: str | Path, shard_size: int) -> dict[str, Any]:
    """Parquet files of ``shard_size`` rows (one row group each, the streaming reader's unit):
    ``key``, ``image`` (``datasets``' Image feature: ``{bytes, path}``), ``caption`` (a list:
    every caption of the image), ``image_id``; ``datasets.load_dataset("parquet")`` reads them."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}.")
    out = fresh_folder(out, "*.parquet")
    features = datasets.Features({"key": datasets.Value("string"), "image": datasets.Image(),
                                  "caption": [datasets.Value("string")],
                                  "image_id": datasets.Value("int64")})
    schema = features.arrow_schema
    files, rows, chunk = [], 0, []

    def flush() -> None:
        path = out / f"part-{len(files):06d}.parquet"
        columns = {"key": [p.key for p in chunk],
                   "image": [{"bytes": p.image, "path": f"{p.image_id:08d}.{p.ext}"} for p in chunk],
                   "caption": [p.captions for p in chunk],
                   "image_id": [p.image_id for p in chunk]}
        pq.write_table(pa.Table.from_pydict(columns, schema=schema), path, row_group_size=shard_size)
        files.append(path)

    for pair in pairs:
        chunk.append(pair)
        rows += 1
        if len(chunk) == shard_size:
            flush()
            chunk = []
    if chunk:
        flush()
    return {"samples": rows, "files": len(files), "bytes": sum(p.stat().st_size for p in files), "folder": str(out)}


def write_csv(pairs: Iterator[Pair], out: str | Path) -> dict[str, Any]:
    """``captions.csv`` (columns ``image``, ``caption``; one row per caption, paths relative
    to the CSV) and the images under ``images/``: open_clip's CSV convention."""
    import csv

    out = fresh_folder(out, "*.csv")
    (out / "images").mkdir(exist_ok=True)
    samples = captions = 0
    with open(out / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for pair in pairs:
            name = f"images/{pair.image_id:08d}.{pair.ext}"  # a shard key may hold '/' or repeat
            (out / name).write_bytes(pair.image)
            writer.writerows([name, c] for c in pair.captions)
            samples, captions = samples + 1, captions + len(pair.captions)
    return {"samples": samples, "captions": captions, "csv": str(out / "captions.csv"),
            "bytes": sum(p.stat().st_size for p in (out / "images").iterdir()) + (out / "captions.csv").stat().st_size}


def is_shards(spec: str) -> bool:
    return spec.endswith(".tar") or (Path(spec).is_dir() and any(Path(spec).glob("*.tar")))


def open_input(spec: str, image_key: str = "image", caption_key: str = "caption", image_root: str | None = None,
               sep: str | None = None) -> Any:
    """The stream source for shards or any table ``spec`` (``tables.open_table``)."""
    if is_shards(spec):
        return ShardSource(expand_shards(spec, "input"))
    try:
        table_kind(spec, "input")
    except UserError:
        if Path(spec).is_dir():  # neither: say what was looked for
            raise UserError(f"{spec!r}: a folder with no shards (*.tar) and none of {LOCAL_FORMS}.") from None
        raise
    return open_table(spec, "input", image_key, caption_key, image_root, sep)


def image_format(data: bytes) -> str:
    """jpg | png | webp | bmp: what the bytes are, for writers that name files by it."""
    from PIL import Image

    found = Image.open(io.BytesIO(data)).format or "PNG"
    return {"JPEG": "jpg", "MPO": "jpg"}.get(found, found.lower())


def source_pairs(source: Any, counts: dict[str, int], problems: list[str]) -> Iterator[Pair]:
    """Every good sample of a source in order; bad ones counted by kind (examples kept)."""
    def on_bad(bad: BadSample, n: int) -> None:
        counts[bad.kind] += n
        problems.append(str(bad))

    image_id = 0
    everything = [(unit, 0, size) for unit, size in enumerate(source.sizes)]
    for _, _, where, raw, image, captions in parsed_samples(source, everything, on_bad):
        try:
            ext = image_format(image)
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises on damaged files
            on_bad(BadSample("bad_image", where, str(err).splitlines()[0]), 1)
            continue
        key = raw.get("__key__", f"{image_id:08d}") if isinstance(raw, dict) else f"{image_id:08d}"
        yield Pair(str(key), image, ext, captions, image_id)
        image_id += 1


WRITERS = ("wds", "parquet", "csv", "coco")


def write_pairs(pairs: Iterator[Pair], out: str | Path, fmt: str, shard_size: int, split: str) -> dict[str, Any]:
    if fmt == "wds":
        return write_shards(pairs, out, shard_size)
    if fmt == "parquet":
        return write_parquet(pairs, out, shard_size)
    if fmt == "csv":
        return write_csv(pairs, out)
    if fmt == "coco":
        return write_coco(pairs, out, split)
    raise UserError(f"--format {fmt!r}: image-caption data is written as one of {', '.join(WRITERS)}.")


def convert(spec: str, out: str | Path, fmt: str, shard_size: int = 1000, split: str = "train",
            **table_keys: Any) -> dict[str, Any]:
    """Any readable input (shards, a table, COCO JSON with ``images``) to ``fmt``; bad samples
    are skipped and reported."""
    counts, problems = dict.fromkeys(SKIP_KINDS[:-1], 0), []
    if spec.endswith(".json"):
        if not table_keys.get("images"):
            raise UserError(f"mml data convert {spec}: a COCO captions JSON needs --images DIR (its image folder).")
        pairs = coco_pairs(spec, table_keys["images"])
    else:
        keys = {k: v for k, v in table_keys.items() if k != "images" and v is not None}
        pairs = source_pairs(open_input(spec, **keys), counts, problems)
    summary = write_pairs(pairs, out, fmt, shard_size, split)
    return {**summary, "skipped": {k: n for k, n in counts.items() if n}, "problems": problems[:5]}


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


def inspect(spec: str, show: int = 3, **table_keys: Any) -> dict[str, Any]:
    """Count the samples of shards or a table, list what a sample holds (file kinds or
    columns) and the first few captions; missing images, bad or missing captions and damaged
    units are reported, not fatal (images are not decoded; a table's image files are read)."""
    source = open_input(spec, **{k: v for k, v in table_keys.items() if v is not None})
    samples, kinds, captions, problems = 0, set(), [], []

    def on_bad(bad: BadSample, n: int) -> None:
        nonlocal samples
        samples += 0 if bad.kind == "truncated" else 1  # a sample that is there, but bad
        problems.append(str(bad))

    everything = [(unit, 0, size) for unit, size in enumerate(source.sizes)]
    for _, _, _, raw, _, caps in parsed_samples(source, everything, on_bad):
        samples += 1
        kinds |= {k for k in raw if not k.startswith("__")}
        if len(captions) < show:
            captions.append(f"{raw.get('__key__', samples - 1)}: {caps[0]}")
    if is_shards(spec):
        total_bytes = sum(Path(name).stat().st_size for name in source.names if "://" not in name)
        what = {"shards": len(source.names), "bytes": total_bytes}
    else:
        what = {"units": len(source.names)}
    return {**what, "samples": samples, "sample_keys": sorted(kinds), "captions": captions, "problems": problems}
