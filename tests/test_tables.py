"""Tables as users have them (CSV, Parquet, datasets folders): `mml data` writes and converts
them, the `table_captions` reader sees exactly what the shard and COCO readers see, bad rows
are counted by kind, and streamed Parquet divides epochs over ranks x workers exactly once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import logged, model_overrides
from tiny import tiny_bert, tiny_vit

from mmlightning.cli import main
from mmlightning.data_modules.shards import ShardSource, expand_shards
from mmlightning.data_modules.streams import SKIP_KINDS, SampleStream, StreamLoader
from mmlightning.data_modules.tables import open_table
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError


def write(fmt: str, out: str, *extra: str) -> None:
    assert main(["data", "write", "shapes", out, "--format", fmt, "--image-format", "png", "--image-size", "32",
                 *extra]) == 0


def tokenizer(minilm: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm)


def stream(source, minilm: Path, train: bool = False, **kwargs) -> SampleStream:
    return SampleStream(source, train, 8, tokenizer(minilm), 16, ImageConfig(size=32), seed=0, shuffle_buffer=10,
                        **kwargs)


def seen(batches) -> list[tuple[int, tuple[str, ...], str]]:
    """(image id, its captions, hash of its decoded pixels) for every image of evaluation
    batches, sorted (a repeated sample shows)."""
    out = []
    for batch in batches:
        for i, image_id in enumerate(batch["image_id"].tolist()):
            pixels = hashlib.sha1(batch["image"][i].numpy().tobytes()).hexdigest()
            out.append((image_id, tuple(batch["references"][i]), pixels))
    return sorted(out)


def test_every_format_gives_the_same_samples(tmp_path: Path, minilm_dir: Path, capsys: pytest.CaptureFixture) -> None:
    import datasets

    from mmlightning.data_modules.coco import CocoCaptionsData

    for fmt in ("wds", "parquet", "csv", "coco"):
        write(fmt, fmt, "--num", "40", "--shard-size", "16")
    # the datasets library's own forms, made by datasets from the Parquet written above
    written = datasets.load_dataset("parquet", data_files=str(tmp_path / "parquet" / "*.parquet"), split="train")
    assert isinstance(written.features["image"], datasets.Image)  # datasets sees images, not bytes
    written.save_to_disk(str(tmp_path / "arrow"))
    (tmp_path / "imagefolder").mkdir()
    with open(tmp_path / "imagefolder" / "metadata.jsonl", "w") as f:
        for row in written.cast_column("image", datasets.Image(decode=False)):
            name = f"{row['image_id']:05d}.png"  # not train-*: datasets would read that as a split name
            (tmp_path / "imagefolder" / name).write_bytes(row["image"]["bytes"])
            f.write(json.dumps({"file_name": name, "caption": row["caption"]}) + "\n")

    expected = seen(StreamLoader(stream(ShardSource(expand_shards("wds", "x")), minilm_dir), lambda: 0, lambda: 0, 0))
    assert [i for i, _, _ in expected] == list(range(40))
    for spec in ("parquet", "csv/captions.csv", "arrow", "imagefolder"):
        source = open_table(str(tmp_path / spec), "data.test_data", "image", "caption", chunk_rows=7)
        got = seen(StreamLoader(stream(source, minilm_dir), lambda: 0, lambda: 0, num_workers=2))
        assert got == expected, spec
    coco = CocoCaptionsData(tokenizer(minilm_dir), 16, ImageConfig(size=32), train_json="", train_images="",
                            val_json="coco/annotations/captions_train2017.json", val_images="coco/train2017")
    coco.setup("validate")
    dataset = coco.datasets["val"]
    from_coco = sorted((i, tuple(dataset.captions[i]), hashlib.sha1(dataset[i][0].numpy().tobytes()).hexdigest())
                       for i in range(len(dataset)))
    assert from_coco == expected

    # converting keeps them: Parquet -> shards -> CSV -> Parquet, and inspect reads each
    capsys.readouterr()
    for src, out, fmt in (("parquet", "c1", "wds"), ("c1", "c2", "csv"), ("c2/captions.csv", "c3", "parquet")):
        assert main(["data", "convert", src, out, "--format", fmt, "--shard-size", "16"]) == 0
        assert json.loads(capsys.readouterr().out)["samples"] == 40
    assert main(["data", "inspect", "c3"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["samples"] == 40 and shown["units"] == 3 and shown["problems"] == []
    round_trip = open_table("c3", "x", "image", "caption")
    assert seen(StreamLoader(stream(round_trip, minilm_dir), lambda: 0, lambda: 0, 0)) == expected


def png(value: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def bad_parquet(path: Path, good: int) -> dict[str, int]:
    """``good`` good rows, then bad rows of each kind a well-typed caption column can hold (a
    wrongly typed one is every row bad: see the test below); returns the expected counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [({"bytes": png(i), "path": None}, [f"image {i}"]) for i in range(good)]
    rows += [({"bytes": b"\x89PNG\r\n\x1a\n not a picture", "path": None}, ["garbage"]),  # bad_image
             ({"bytes": None, "path": "nowhere.png"}, ["no file"]),  # missing_image
             ({"bytes": None, "path": None}, ["nothing at all"]),  # missing_image
             ({"bytes": png(1), "path": None}, None),  # missing_caption
             ({"bytes": png(2), "path": None}, ["  ", ""])]  # empty_caption
    table = pa.table({"image": pa.array([r[0] for r in rows], image), "caption": pa.array([r[1] for r in rows],
                                                                                          pa.list_(pa.string()))})
    pq.write_table(table, path, row_group_size=8)
    return {"bad_image": 1, "missing_image": 2, "missing_caption": 1, "empty_caption": 1}


def test_bad_rows_are_counted_by_kind_and_strict_names_the_row(tmp_path: Path, minilm_dir: Path) -> None:
    expected = bad_parquet(tmp_path / "bad.parquet", good=19)
    source = open_table(str(tmp_path / "bad.parquet"), "data.train_data", "image", "caption")
    assert source.sizes == [8, 8, 8]  # row groups are the units
    batches = list(StreamLoader(stream(source, minilm_dir), lambda: 0, lambda: 0, 0))
    assert sum(len(b["image_id"]) for b in batches) == 19
    counts = dict(zip(SKIP_KINDS, batches[-1]["skipped"].tolist()))
    assert {k: n for k, n in counts.items() if n} == expected
    assert any("bad.parquet row 19" in e for e in batches[-1]["skipped_examples"])
    with pytest.raises(UserError, match=r"strict.*bad image: .*bad.parquet row 19"):
        list(stream(source, minilm_dir, strict=True))
    # a CSV: a missing file and an image whose one caption is empty
    (tmp_path / "a.png").write_bytes(png(3))
    (tmp_path / "t.csv").write_text("filepath,title\na.png,one\nmissing.png,two\na.png,three\nb.png,\n")
    csv = open_table(str(tmp_path / "t.csv"), "data.train_data", "filepath", "title")
    batches = list(StreamLoader(stream(csv, minilm_dir), lambda: 0, lambda: 0, 0))
    assert batches[0]["references"] == [["one", "three"]]  # rows naming one image are one image
    counts = dict(zip(SKIP_KINDS, batches[-1]["skipped"].tolist()))
    assert counts["missing_image"] == 1 and counts["empty_caption"] == 1
    assert "t.csv line 3 (missing.png)" in " ".join(batches[-1]["skipped_examples"])
    # a caption column of the wrong type: every row is a bad caption, named as such
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [png(1), png(2)], "caption": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"image": [png(3)], "caption": ["fine"]}), tmp_path / "fine.parquet")
    both = [str(tmp_path / "fine.parquet"), str(tmp_path / "ints.parquet")]  # a reader with no good row cannot report
    batches = list(StreamLoader(stream(open_table(both, "k", "image", "caption"), minilm_dir), lambda: 0, lambda: 0, 0))
    assert dict(zip(SKIP_KINDS, batches[-1]["skipped"].tolist()))["bad_caption"] == 2
    assert "'caption' is a int, not a string or a list of strings" in batches[-1]["skipped_examples"][0]
    # a row group that cannot be read: its rows are counted lost, the others still read
    bad_parquet(tmp_path / "cut.parquet", good=19)
    data = bytearray((tmp_path / "cut.parquet").read_bytes())
    with pq.ParquetFile(tmp_path / "cut.parquet") as file:
        column = file.metadata.row_group(1).column(0)
        start = column.data_page_offset
    data[start + 8:start + 400] = b"\xff" * 392
    (tmp_path / "cut.parquet").write_bytes(bytes(data))
    batches = list(StreamLoader(stream(open_table(str(tmp_path / "cut.parquet"), "k", "image", "caption"),
                                       minilm_dir), lambda: 0, lambda: 0, 0))
    counts = dict(zip(SKIP_KINDS, batches[-1]["skipped"].tolist()))
    assert counts["truncated"] == 8 and sum(len(b["image_id"]) for b in batches) == 19 - 8 + 0


def test_sources_pickle_for_spawned_workers_and_odd_keys_convert(tmp_path: Path) -> None:
    """Loader workers that are spawned (macOS, forkserver) get the source pickled; a shard key
    with a '/' and a caption with a newline survive conversion to CSV and back."""
    import pickle

    from mmlightning.data_modules.write import Pair, write_csv

    write("parquet", "pq", "--num", "6")
    write("csv", "csv", "--num", "6")
    import datasets

    datasets.load_dataset("parquet", data_files="pq/*.parquet", split="train").save_to_disk("arrow")
    for spec in ("pq", "csv/captions.csv", "arrow"):
        source = pickle.loads(pickle.dumps(open_table(spec, "k", "image", "caption", chunk_rows=4)))
        assert sum(len(list(source.read(u, 0, n))) for u, n in enumerate(source.sizes)) == 6
    pairs = [Pair("dir/a", png(5), "png", ["two\nlines", "plain"], 0), Pair("dir/a", png(6), "png", ["other"], 1)]
    write_csv(iter(pairs), tmp_path / "odd")
    source = open_table(str(tmp_path / "odd" / "captions.csv"), "k", "image", "caption")
    rows = [source.parse(row, where) for _, where, row in source.read(0, 0, source.sizes[0])]
    assert [captions for _, captions in rows] == [["two\nlines", "plain"], ["other"]]
    assert rows[0][0] == png(5) and rows[1][0] == png(6)  # the repeated key did not merge two images


def test_a_table_that_does_not_fit_fails_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    write("parquet", "pq", "--num", "8")
    with pytest.raises(UserError, match=r"data.train_data: .*part-000000.parquet has no column 'text' "
                                        r"\(data.caption_key\); its columns are 'key', 'image', 'caption', 'image_id'"):
        open_table("pq", "data.train_data", "image", "text")
    (tmp_path / "x.csv").write_text("image,caption\n")
    with pytest.raises(UserError, match=r"no column 'filepath' \(data.image_key\)"):
        open_table("x.csv", "k", "filepath", "caption")
    with pytest.raises(UserError, match=r"k: 'nope/' does not exist"):
        open_table("nope/", "k", "image", "caption")
    with pytest.raises(UserError, match=r"data.val_data: 'data/val.csv' does not exist"):  # not a hub id
        open_table("data/val.csv", "data.val_data", "image", "caption")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"data.val_data: 'someone/captions' would be a hub dataset, but the hub is "
                                        r"offline .* Give a local form: a .csv/.tsv file, .parquet"):
        open_table("someone/captions", "data.val_data", "image", "caption")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": ["a"], "caption": ["b"]})}).save_to_disk("dd")
    with pytest.raises(UserError, match=r"holds splits 'train'; give one split's folder \(e.g. dd/train\)"):
        open_table("dd", "k", "image", "caption")
    with pytest.raises(UserError, match="'missing.csv' does not exist"):
        open_table("missing.csv", "data.train_data", "image", "caption")


def test_clip_and_captioning_fit_on_tables_and_resume(tmp_path: Path, minilm_dir: Path) -> None:
    write("parquet", "train", "--num", "96", "--shard-size", "16")
    write("csv", "val", "--num", "20", "--split", "val")
    data = ("data={name: table_captions, train_data: train, val_data: val/captions.csv, test_data: val/captions.csv, "
            "batch_size: 8, eval_batch_size: 8, num_workers: 0, shuffle_buffer: 16}")
    common = ["fit", "clip-wds", *tiny_vit(), *tiny_bert(minilm_dir), "model.embed_dim=16", data,
              "scheduler.warmup_steps=2", "trainer.num_sanity_val_steps=0", "logger.name=none"]
    assert main([*common, "trainer.max_epochs=1", "run.name=t"]) == 0
    summary = json.loads(Path("runs/t/summary.json").read_text())
    assert summary["global_step"] == 12 and "test/i2t_R@1" in summary["test"]

    # captioning reads the same tables (its batches' references: every caption of an image)
    captioning = ("data={name: table_captions, train_data: train, val_data: val/captions.csv, "
                  "test_data: val/captions.csv, batch_size: 8, eval_batch_size: 8, num_workers: 0}")
    assert main(["fit", "caption-shapes", captioning, "trainer.max_steps=3", "model.generation.max_new_tokens=4",
                 "model.generation.num_beams=1", "logger.name=none", "run.name=c"]) == 0
    assert "test/CIDEr-D" in json.loads(Path("runs/c/summary.json").read_text())["test"]

    # mid-epoch resume over row groups with two loader workers: the same next batches
    source = open_table("train", "data.train_data", "image", "caption")

    def epoch_batches(state: dict | None) -> list[dict]:
        loader = StreamLoader(stream(source, minilm_dir, train=True), epoch=lambda: 1, batches_done=lambda: 0,
                              num_workers=2)
        if state:
            loader.load_state_dict(state)
        torch.manual_seed(len(state or {}))
        return list(loader)

    full, resumed = epoch_batches(None), epoch_batches({"epoch": 1, "batches_done": 5})
    assert len(full) == 12
    assert [b["image_id"].tolist() for b in resumed] == [b["image_id"].tolist() for b in full[5:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[5:]))


# writes each training step's and each validation's sample ids at once (a stopped run keeps
# what it did), and stops itself with SIGTERM on rank 0 at step STOP_AT_STEP, as a preempted job would be
STEP_RECORDING_TASK = '''
import json, os, signal
from mmlightning.registry import TASKS
from mmlightning.tasks.clip import CLIPTask

@TASKS.register("clip_step_recording")
class StepRecordingCLIP(CLIPTask):
    def record(self, *entry):
        with open(f"steps-{os.environ['LEG']}-rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\\n")

    def training_step(self, batch, batch_idx):
        self.record("train", self.global_step, batch["image_id"].tolist())
        if self.global_rank == 0 and self.global_step == int(os.environ.get("STOP_AT_STEP", "-1")):
            os.kill(os.getpid(), signal.SIGTERM)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.record("val", self.current_epoch, batch["image_id"].tolist())
        return super().validation_step(batch, batch_idx)
'''


def recorded(tmp_path: Path, leg: str, rank: int) -> tuple[dict[int, list[int]], dict[int, list[int]]]:
    """(step -> training ids, epoch -> validation ids) of one rank; a later line for a step
    (the resumed leg's) replaces an earlier one."""
    train, val = {}, {}
    for kind, at, ids in map(json.loads, (tmp_path / f"steps-{leg}-rank{rank}.jsonl").read_text().splitlines()):
        if kind == "train":
            train[at] = ids
        else:
            val[at] = val.get(at, []) + ids
    return train, val


@pytest.mark.slow
def test_streamed_parquet_two_ranks_two_workers_once_per_epoch(tmp_path: Path, minilm_dir: Path) -> None:
    """Training: 200 rows in row groups of 24 = 4 readers x 5 batches x 10, each exactly once per
    epoch. Validation: 45 good rows and one of each bad kind, each good row once, the bad counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write("parquet", "train", "--num", "200", "--shard-size", "24")
    write("parquet", "good_val", "--num", "45", "--split", "val")
    expected = bad_parquet(tmp_path / "bad.parquet", good=0)
    bad = pq.read_table(tmp_path / "bad.parquet")
    good = pq.read_table("good_val").select(["image", "caption"]).cast(bad.schema)
    (tmp_path / "val").mkdir()
    pq.write_table(pa.concat_tables([good, bad]), tmp_path / "val" / "val.parquet", row_group_size=20)
    data = ("data={name: table_captions, train_data: train, val_data: val, batch_size: 10, eval_batch_size: 7, "
            "shuffle_buffer: 20, max_bad_fraction: 0.1}")
    (tmp_path / "steps.py").write_text(STEP_RECORDING_TASK)
    recipe = ["clip-wds", *model_overrides(minilm_dir), data, "imports=[steps.py]", "task=clip_step_recording",
              "data.num_workers=2", "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=2",
              "trainer.strategy=ddp", "logger.name=csv"]

    def fit(leg: str, *args: str, stop_at: int = -1) -> subprocess.CompletedProcess:
        env = {**os.environ, "LEG": leg, "STOP_AT_STEP": str(stop_at), "PYTHONUNBUFFERED": "1"}
        return subprocess.run([sys.executable, "-m", "mmlightning.cli", "fit", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)

    # stopped by SIGTERM mid-epoch (step 13 of 20: epoch 1, batch 3) and resumed; the two legs together must be
    # two whole epochs: every row once per epoch on the two ranks, none repeated or skipped around the cut
    cut = fit("cut", *recipe, "run.name=ddp", stop_at=13)
    assert cut.returncode == 143, cut.stderr[-3000:]
    resumed = fit("cut", "clip-wds", "--resume", "runs/ddp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ranks = [recorded(tmp_path, "cut", r) for r in (0, 1)]
    for epoch in (0, 1):
        batches = [[ids for step, ids in train.items() if step // 10 == epoch] for train, _ in ranks]
        assert [len(b) for b in batches] == [10, 10]  # the same number of steps on both ranks
        assert sorted(i for rank in batches for batch in rank for i in batch) == list(range(200))
        assert sorted(i for _, val in ranks for i in val[epoch]) == list(range(45))
    order = [[i for step, ids in train.items() if step // 10 == e for i in ids] for train, _ in ranks for e in (0, 1)]
    assert order[0] != order[1] and order[2] != order[3]  # a new order each epoch
    assert set(order[0]) != set(order[1])  # the row groups, not only the order within a rank, move
    counts = logged(tmp_path)
    for kind in ("bad_image", "missing_image", "bad_caption", "missing_caption", "empty_caption", "truncated"):
        assert counts[f"data/val_skipped_{kind}"] == expected.get(kind, 0), kind
    assert counts["data/train_skipped_bad_image"] == 0


def test_a_resumed_parquet_epoch_continues_with_the_same_batches(tmp_path: Path, minilm_dir: Path) -> None:
    """The loader state a checkpoint keeps (epoch, batches done) resumes a streamed Parquet
    epoch with two workers on the very batches the uninterrupted epoch had next."""
    write("parquet", "train", "--num", "96", "--shard-size", "16")

    def epoch_batches(state: dict[str, int] | None) -> list[dict]:
        loader = StreamLoader(stream(open_table("train", "data.train_data", "image", "caption"), minilm_dir, train=True),
                              epoch=lambda: 1, batches_done=lambda: 0, num_workers=2)
        if state:
            loader.load_state_dict(state)
        torch.manual_seed(len(state or {}))  # crops must not depend on the main process's RNG
        return list(loader)

    full = epoch_batches(None)
    assert len(full) == 12  # 2 workers x (48 // 8) batches
    resumed = epoch_batches({"epoch": 1, "batches_done": 5})
    assert [b["image_id"].tolist() for b in resumed] == [b["image_id"].tolist() for b in full[5:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(resumed, full[5:]))
