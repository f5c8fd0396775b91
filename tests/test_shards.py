"""Webdataset shards: `mml data` writes them, the data module reads every sample exactly once
per epoch across ranks x workers, counts bad samples exactly, and clip-wds trains on them."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from tiny import tiny_bert, tiny_vit

from mmlightning.cli import main
from mmlightning.data_modules.shards import ShardSource, count_samples, expand_shards, shard_sizes
from mmlightning.data_modules.streams import SampleStream, StreamLoader
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError

# a CLIP task that writes down which sample ids each rank trains and validates on, per epoch
RECORDING_TASK = '''
import json, os
from mmlightning.registry import TASKS
from mmlightning.tasks.clip import CLIPTask

@TASKS.register("clip_recording")
class RecordingCLIP(CLIPTask):
    seen = {}

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(f"train{self.current_epoch}", []).append(batch["image_id"].tolist())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            self.seen.setdefault(f"val{self.current_epoch}", []).append(batch["image_id"].tolist())
        return super().validation_step(batch, batch_idx)

    def on_train_epoch_end(self):
        super().on_train_epoch_end()
        with open(f"seen-rank{self.global_rank}.json", "w") as f:
            json.dump(self.seen, f)
'''


def model_overrides(minilm: Path) -> list[str]:
    return [*tiny_vit(), *tiny_bert(minilm), "model.embed_dim=16", "scheduler.warmup_steps=2",
            "trainer.log_every_n_steps=2", "trainer.num_sanity_val_steps=0"]


def wds_overrides(minilm: Path, train: Path, val: Path) -> list[str]:
    return [*model_overrides(minilm), f"data.train_shards={train}", f"data.val_shards={val}",
            f"data.test_shards={val}", "data.batch_size=10", "data.eval_batch_size=7", "data.shuffle_buffer=20"]


def write(source_args: list[str]) -> None:
    assert main(["data", "write", "shapes", *source_args]) == 0


def damage(folder: Path) -> tuple[int, int]:
    """One undecodable image in shard 1; shard 3 cut short. Returns (bad images, samples lost)."""
    shard = folder / "shard-000001.tar"
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 3 * 3 + 1:  # the 4th sample's image (json, png, txt per sample)
                assert m.name.endswith(".png")
                data = b"\x89PNG\r\n\x1a\n this is not a picture"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    cut = folder / "shard-000003.tar"
    before = count_samples(str(cut))
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.55)])
    return 1, before - count_samples(str(cut))


def run_ddp(tmp_path: Path, overrides: list[str], *extra: str) -> subprocess.CompletedProcess:
    """`mml fit clip-wds` on 2 ranks x 2 loader workers (gloo), recording the ids each rank sees."""
    (tmp_path / "recording.py").write_text(RECORDING_TASK)
    cmd = [sys.executable, "-m", "mmlightning.cli", "fit", "clip-wds", *overrides,
           "imports=[recording.py]", "task=clip_recording", "data.num_workers=2", "trainer.max_epochs=2",
           "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "logger.name=csv", "run.name=ddp",
           *extra]
    out = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def logged(tmp_path: Path) -> dict[str, float]:
    """The last logged value of each column of the run's CSV log."""
    values: dict[str, float] = {}
    with open(tmp_path / "runs" / "ddp" / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


@pytest.mark.slow
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(tmp_path: Path, minilm_dir: Path) -> None:
    # 200 training samples in shards of 24 (the last has 8): 4 readers x 5 batches x 10 = all of them
    write(["train", "--num", "200", "--shard-size", "24", "--image-format", "png", "--image-size", "32"])
    write(["val", "--split", "val", "--num", "45", "--shard-size", "20", "--image-size", "32"])
    run_ddp(tmp_path, wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "val"))
    ranks = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        batches = [seen[f"train{epoch}"] for seen in ranks]
        assert [len(b) for b in batches] == [10, 10]  # the same number of steps on both ranks
        ids = [i for rank in batches for batch in rank for i in batch]
        assert sorted(ids) == list(range(200))  # every sample exactly once
        val = [i for seen in ranks for batch in seen[f"val{epoch}"] for i in batch]
        assert sorted(val) == list(range(45))  # evaluation too, 45 not a multiple of anything
    order = [[i for batch in seen[f"train{e}"] for i in batch] for seen in ranks for e in (0, 1)]
    assert order[0] != order[1] and order[2] != order[3]  # a new order each epoch
    assert set(order[0]) != set(order[1])  # the shards, not only the order within a rank, move
    counts = logged(tmp_path)
    assert counts["data/train_skipped_bad_image"] == 0 and counts["data/val_skipped_truncated"] == 0


@pytest.mark.slow
def test_bad_samples_are_counted_exactly_and_logged(tmp_path: Path, minilm_dir: Path) -> None:
    write(["train", "--num", "200", "--shard-size", "24", "--image-format", "png", "--image-size", "32"])
    write(["val", "--split", "val", "--num", "45", "--shard-size", "20", "--image-size", "32"])
    bad, lost = damage(tmp_path / "train")
    assert lost > 0
    run_ddp(tmp_path, wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "val"), "data.max_bad_fraction=0.2")
    counts = logged(tmp_path)
    assert counts["data/train_skipped_bad_image"] == bad
    assert counts["data/train_skipped_truncated"] == lost
    assert counts["data/train_skipped_repeated"] == bad + lost  # refilled, so every rank still steps 10 times
    ranks = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(seen["train1"]) for seen in ranks] == [10, 10]


def stream(folder: Path, train: bool, **kwargs) -> SampleStream:
    from transformers import AutoTokenizer

    urls = expand_shards(str(folder), "data.train_shards")
    return SampleStream(ShardSource(urls), train, 8, AutoTokenizer.from_pretrained(kwargs.pop("minilm")), 16,
                       ImageConfig(size=32), seed=0, shuffle_buffer=10, **kwargs)


def test_strict_mode_names_the_shard_and_key(tmp_path: Path, minilm_dir: Path) -> None:
    write(["train", "--num", "100", "--shard-size", "24", "--image-format", "png", "--image-size", "32"])
    damage(tmp_path / "train")
    lenient = [b for b in stream(tmp_path / "train", train=False, minilm=minilm_dir)]
    assert lenient[-1]["skipped"].tolist()[:1] == [1]  # bad_image counted, reading went on
    with pytest.raises(UserError, match=r"strict.*bad image: .*shard-000001.tar key 'train-00000027'"):
        list(stream(tmp_path / "train", train=False, minilm=minilm_dir, strict=True))


def test_too_many_bad_samples_stop_the_run(tmp_path: Path, minilm_dir: Path, capsys: pytest.CaptureFixture) -> None:
    write(["train", "--num", "100", "--shard-size", "24", "--image-format", "png", "--image-size", "32"])
    write(["val", "--split", "val", "--num", "20", "--image-size", "32"])
    damage(tmp_path / "train")
    args = ["fit", "clip-wds", *wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "val"), "data.num_workers=0",
            "trainer.max_epochs=1", "logger.name=none", "run.name=b"]
    with pytest.raises(UserError, match=r"bad train samples this epoch over all ranks \(.*truncated \d+.*\): more "
                                          r"than data.max_bad_fraction=0.01 of the epoch's 100; e.g. .*shard-00000"):
        main(["--traceback", *args])


def test_clip_wds_fits_and_resumes_on_written_shards(tmp_path: Path, minilm_dir: Path) -> None:
    write(["train", "--num", "80", "--shard-size", "16", "--image-size", "32"])
    write(["val", "--split", "val", "--num", "20", "--image-size", "32"])
    overrides = [*wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "val"), "data.num_workers=0",
                 "logger.name=none"]
    assert main(["fit", "clip-wds", *overrides, "trainer.max_epochs=2", "run.name=w"]) == 0
    summary = json.loads((tmp_path / "runs" / "w" / "summary.json").read_text())
    assert summary["global_step"] == 16 and "test/i2t_R@1" in summary["test"]


def test_data_writes_coco_and_vqav2_the_readers_accept(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmlightning.data_modules.coco import read_coco_captions
    from mmlightning.data_modules.vqav2 import read_annotations, read_questions

    assert main(["data", "write", "shapes", "coco", "--format", "coco", "--split", "val", "--num", "6"]) == 0
    paths, captions = read_coco_captions("coco/annotations/captions_val2017.json", "coco/val2017")
    assert len(paths) == 6 and all(p.is_file() for p in paths) and all(captions)
    assert main(["data", "write", "shapes", "vqa", "--format", "vqav2", "--split", "val", "--num", "6"]) == 0
    subtype, questions = read_questions("vqa/v2_OpenEnded_mscoco_val2014_questions.json", "questions")
    annotations = read_annotations("vqa/v2_mscoco_val2014_annotations.json", "annotations")
    assert subtype == "val2014" and len(questions) == len(annotations) > 6
    assert all(len(a["answers"]) == 10 for a in annotations)
    capsys.readouterr()
    assert main(["data", "inspect", "coco/val2017"]) == 2  # neither shards nor a table: a clear error
    assert "no shards" in capsys.readouterr().err
    assert main(["data", "write", "coco", "shards", "--json", "coco/annotations/captions_val2017.json",
                 "--images", "coco/val2017", "--shard-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out) == {"samples": 6, "shards": 2, "bytes": pytest.approx(
        sum(p.stat().st_size for p in Path("shards").glob("*.tar"))), "folder": "shards"}
    assert main(["data", "inspect", "shards/shard-{000000..000001}.tar", "--show", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["samples"] == 6 and shown["sample_keys"] == ["jpg", "json", "txt"] and len(shown["captions"]) == 2
    assert torch.tensor(shard_sizes(expand_shards("shards", "x"))).tolist() == [4, 2]


def test_a_resumed_epoch_continues_after_the_batches_done(tmp_path: Path, minilm_dir: Path) -> None:
    """The loader's checkpointed state (epoch, batches done) resumes mid-epoch with two
    workers: the same batches, in the same order, as the rest of an uninterrupted epoch."""
    write(["train", "--num", "96", "--shard-size", "16", "--image-size", "32"])

    def epoch_batches(state: dict[str, int] | None) -> list[dict]:
        loader = StreamLoader(stream(tmp_path / "train", train=True, minilm=minilm_dir), epoch=lambda: 1,
                             batches_done=lambda: 0, num_workers=2)
        if state:
            loader.load_state_dict(state)
        torch.manual_seed(len(state or {}))  # crops must not depend on the main process's RNG
        return list(loader)

    full = epoch_batches(None)
    assert len(full) == 12  # 2 workers x (48 // 8) batches
    resumed = epoch_batches({"epoch": 1, "batches_done": 5})
    assert [b["image_id"].tolist() for b in resumed] == [b["image_id"].tolist() for b in full[5:]]
    assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(resumed, full[5:]))
    first_epoch = StreamLoader(stream(tmp_path / "train", train=True, minilm=minilm_dir), epoch=lambda: 0,
                              batches_done=lambda: 0, num_workers=2)
    assert [b["image_id"].tolist() for b in first_epoch] != [b["image_id"].tolist() for b in full]


def test_captioning_trains_on_shards_by_data_override(fixtures: dict[str, Path]) -> None:
    shards = fixtures["shards"]
    data = (f"data={{name: wds_captions, train_shards: {shards}/train, val_shards: {shards}/val, "
            f"test_shards: {shards}/val, batch_size: 8, eval_batch_size: 8, num_workers: 0}}")
    assert main(["fit", "caption-shapes", data, "trainer.max_steps=3", "model.generation.max_new_tokens=4",
                 "model.generation.num_beams=1", "logger.name=none", "run.name=c"]) == 0
    summary = json.loads(Path("runs/c/summary.json").read_text())
    assert "test/CIDEr-D" in summary["test"] and summary["global_step"] == 3


def test_resume_saved_at_an_epochs_end_starts_the_next_epoch(tmp_path: Path, minilm_dir: Path) -> None:
    """Lightning builds the resumed iterator before it advances its epoch counter: the
    loaded state (next epoch, nothing done) wins over the counter."""
    write(["train", "--num", "48", "--shard-size", "16", "--image-size", "32"])

    def ids(epoch_now: int, state: dict[str, int] | None) -> list[list[int]]:
        loader = StreamLoader(stream(tmp_path / "train", train=True, minilm=minilm_dir), epoch=lambda: epoch_now,
                             batches_done=lambda: 0, num_workers=0)
        if state:
            loader.load_state_dict(state)
        return [b["image_id"].tolist() for b in loader]

    assert ids(0, {"epoch": 1, "batches_done": 0}) == ids(1, None) != ids(0, None)


def test_malformed_captions_are_counted_not_fatal(tmp_path: Path, minilm_dir: Path) -> None:
    import webdataset as wds
    from PIL import Image

    (tmp_path / "odd").mkdir()
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 20, 20)).save(png, format="PNG")
    captions = [{"json": b"{not json"}, {"json": b"[1, 2]"}, {"json": b'{"captions": "a dog"}'},
                {"txt": b"\xff\xfe caf\xe9"}, {"txt": b"   "}, {}, {"txt": b"a red square"}]
    with wds.TarWriter(str(tmp_path / "odd" / "odd-0.tar")) as sink:
        for i, caption in enumerate(captions):
            sink.write({"__key__": f"{i:04d}", "png": png.getvalue(), **caption})
    batches = list(stream(tmp_path / "odd", train=False, minilm=minilm_dir))
    assert [i for b in batches for i in b["image_id"].tolist()] == [6]
    counts = dict(zip(("bad_image", "missing_image", "bad_caption", "missing_caption", "empty_caption"),
                      batches[-1]["skipped"].tolist()))
    assert counts == {"bad_image": 0, "missing_image": 0, "bad_caption": 4, "missing_caption": 1, "empty_caption": 1}


def test_strict_mode_stops_a_run_with_loader_workers(tmp_path: Path, minilm_dir: Path) -> None:
    write(["train", "--num", "100", "--shard-size", "24", "--image-format", "png", "--image-size", "32"])
    write(["val", "--split", "val", "--num", "20", "--image-size", "32"])
    damage(tmp_path / "train")
    args = ["fit", "clip-wds", *wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "val"), "data.num_workers=2",
            "data.strict=true", "trainer.max_epochs=1", "logger.name=none", "run.name=s"]
    with pytest.raises(UserError, match=r"data.strict=true; e.g. .*shard-00000[13].tar"):
        main(["--traceback", *args])


def test_too_few_samples_for_one_batch_per_reader_is_an_error(tmp_path: Path, minilm_dir: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    write(["train", "--num", "20", "--image-size", "32"])
    args = ["fit", "clip-wds", *wds_overrides(minilm_dir, tmp_path / "train", tmp_path / "train"),
            "data.num_workers=2", "data.batch_size=16", "logger.name=none", "run.name=f"]
    assert main(args) == 2
    assert "20 samples per epoch make no full batch of 16 for each of 2 readers" in capsys.readouterr().err


def test_resampled_streams_and_fsspec_urls(tmp_path: Path, minilm_dir: Path) -> None:
    """mode=resampled draws shards with replacement for a set budget per epoch, new draws each
    epoch; shards named by URL (here file://, as s3:// or gs:// would be) are read through fsspec."""
    from transformers import AutoTokenizer

    write(["train", "--num", "40", "--shard-size", "10", "--image-size", "32"])
    urls = expand_shards(f"file://{tmp_path}/train/shard-{{000000..000003}}.tar", "data.train_shards")
    assert shard_sizes(urls) == [10, 10, 10, 10]  # from sizes.json, read through fsspec too
    resampled = SampleStream(ShardSource(urls), True, 8, AutoTokenizer.from_pretrained(minilm_dir), 16,
                            ImageConfig(size=32), seed=0, mode="resampled", samples_per_epoch=64, shuffle_buffer=8)

    def epoch(n: int) -> list[int]:
        loader = StreamLoader(resampled, epoch=lambda: n, batches_done=lambda: 0, num_workers=0)
        assert len(loader) == 8
        return [i for b in loader for i in b["image_id"].tolist()]

    first, second = epoch(0), epoch(1)
    assert len(first) == len(second) == 64 and set(first) <= set(range(40))
    assert len(set(first)) < 64 and first != second  # with replacement, and a new draw each epoch
