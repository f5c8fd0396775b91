"""Karpathy-split COCO captions: split sizes, batch layout through real DataLoaders, and
malformed files failing with the file and the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from mmlightning.data_modules.coco_karpathy import CaptionCollate, CocoKarpathyData
from mmlightning.data_modules.shapes_world import vocabulary
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize, word_tokenizer
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES

MAX_LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(vocabulary())


def entries(root: Path) -> list[dict]:
    return json.loads((root / "dataset_coco.json").read_text())["images"]


def make(root: Path, tokenizer, json_path: Path | None = None, **kwargs) -> CocoKarpathyData:
    return CocoKarpathyData(tokenizer=tokenizer, max_length=MAX_LENGTH, image_config=ImageConfig(size=64),
                            json_path=str(json_path or root / "dataset_coco.json"), image_root=str(root), **kwargs)


def test_split_sizes(karpathy_fixture: Path, tokenizer) -> None:
    data = make(karpathy_fixture, tokenizer)
    data.setup()
    images = entries(karpathy_fixture)
    captions = lambda splits: sum(len(e["sentences"]) for e in images if e["split"] in splits)  # noqa: E731
    assert len(data.datasets["train"]) == captions({"train", "restval"})  # restval trains too
    assert len(data.datasets["val"]) == 5 and len(data.datasets["test"]) == 5
    only_train = make(karpathy_fixture, tokenizer, train_splits=["train"])
    only_train.setup("fit")
    assert len(only_train.datasets["train"]) == captions({"train"})
    assert set(only_train.datasets) == {"train", "val"}


def test_built_by_name(karpathy_fixture: Path, tokenizer) -> None:
    spec = {"name": "coco_karpathy", "json_path": str(karpathy_fixture / "dataset_coco.json"),
            "image_root": str(karpathy_fixture), "batch_size": 4}
    data = DATA_MODULES.build(spec, "data", tokenizer=tokenizer, max_length=MAX_LENGTH, image_config=ImageConfig(size=64))
    assert isinstance(data, CocoKarpathyData)
    with pytest.raises(UserError, match="data.train_splits.*valid: train, restval, val, test"):
        make(karpathy_fixture, tokenizer, train_splits=["training"])


def test_train_batches(karpathy_fixture: Path, tokenizer) -> None:
    data = make(karpathy_fixture, tokenizer, batch_size=8, num_workers=1)
    data.setup("fit")
    by_id = {e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries(karpathy_fixture)
             if e["split"] in ("train", "restval")}
    seen: list[tuple[int, list[int]]] = []
    for batch in data.train_dataloader():
        assert set(batch) == {"image", "input_ids", "attention_mask", "image_id"}
        b = len(batch["image_id"])
        assert batch["image"].shape == (b, 3, 64, 64) and batch["image"].dtype == torch.float32
        assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == b
        assert batch["image_id"].dtype == torch.long and batch["input_ids"].dtype == torch.long
        for image_id, ids, mask in zip(batch["image_id"].tolist(), batch["input_ids"], batch["attention_mask"]):
            seen.append((image_id, ids[mask.bool()].tolist()))
    # every caption exactly once per epoch, with its own image
    expected = sorted((i, tokenizer(c, truncation=True, max_length=MAX_LENGTH)["input_ids"])
                      for i, caps in by_id.items() for c in caps)
    assert sorted(seen) == expected
    # in file order, a batch is exactly what the tokenizer gives for those captions, padding included
    loader = DataLoader(data.datasets["train"], batch_size=5, collate_fn=CaptionCollate(tokenizer, evaluation=False))
    first = next(iter(loader))
    want = tokenize(tokenizer, [c for caps in by_id.values() for c in caps][:5], MAX_LENGTH)
    assert torch.equal(first["input_ids"], want["input_ids"])
    assert torch.equal(first["attention_mask"], want["attention_mask"])


def test_eval_batches_carry_all_references(karpathy_fixture: Path, tokenizer) -> None:
    data = make(karpathy_fixture, tokenizer, eval_batch_size=3)
    data.setup()
    for split, loader in (("val", data.val_dataloader()), ("test", data.test_dataloader())):
        want = {e["cocoid"]: [s["raw"] for s in e["sentences"]] for e in entries(karpathy_fixture) if e["split"] == split}
        got: dict[int, list[str]] = {}
        for batch in loader:
            assert set(batch) == {"image", "image_id", "references"}
            assert batch["image"].shape == (len(batch["image_id"]), 3, 64, 64)
            assert batch["image_id"].dtype == torch.long
            got.update(zip(batch["image_id"].tolist(), batch["references"]))
        assert got == want
        assert {len(r) for r in got.values()} <= {2, 3, 4, 5}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset_coco.json"
    path.write_text(text)
    return path


def test_malformed_files_name_the_file_and_problem(karpathy_fixture: Path, tokenizer, tmp_path: Path) -> None:
    images = entries(karpathy_fixture)
    bad = write(tmp_path, "{not json")
    with pytest.raises(UserError, match=f"{re.escape(str(bad))}: not valid JSON"):
        make(karpathy_fixture, tokenizer, bad).setup()
    bad = write(tmp_path, json.dumps({"dataset": "coco", "annotations": []}))
    with pytest.raises(UserError, match=f"{re.escape(str(bad))}: expected a top-level list 'images'"):
        make(karpathy_fixture, tokenizer, bad).setup()
    no_sentences = [dict(e) for e in images]
    del no_sentences[3]["sentences"]
    bad = write(tmp_path, json.dumps({"images": no_sentences}))
    problem = rf"images\[3\] \({images[3]['filename']}\) has no 'sentences'"
    with pytest.raises(UserError, match=f"{re.escape(str(bad))}: {problem}"):
        make(karpathy_fixture, tokenizer, bad).setup()
    bad_split = [dict(e) for e in images]
    bad_split[0]["split"] = "training"
    bad = write(tmp_path, json.dumps({"images": bad_split}))
    with pytest.raises(UserError, match=r"images\[0\] has split 'training'; valid: train, restval, val, test"):
        make(karpathy_fixture, tokenizer, bad).setup()
    missing = [dict(e) for e in images]
    missing[-1]["filename"] = "COCO_val2014_000000999999.jpg"  # a test image
    bad = write(tmp_path, json.dumps({"images": missing}))
    make(karpathy_fixture, tokenizer, bad).setup("fit")  # only the splits in use are checked
    with pytest.raises(UserError, match=f"{re.escape(str(bad))}: 1 image file.* missing .*COCO_val2014_000000999999.jpg"):
        make(karpathy_fixture, tokenizer, bad).setup("test")
    with pytest.raises(UserError, match="does not exist"):
        make(karpathy_fixture, tokenizer, tmp_path / "nope.json").setup()


def test_a_karpathy_file_without_a_test_split_fails_before_training(karpathy_fixture: Path, minilm_dir: Path,
                                                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """caption-coco on a file whose images are train and val only: refused before the run
    directory exists, not after training."""
    from tiny import karpathy_overrides

    from mmlightning.cli import main

    images = [dict(e, split="val" if e["split"] == "test" else e["split"]) for e in entries(karpathy_fixture)]
    no_test = write(tmp_path, json.dumps({"images": images}))
    code = main(["fit", "caption-coco", *karpathy_overrides(karpathy_fixture, minilm_dir), f"data.json_path={no_test}",
                 "run.name=k", "logger.name=none"])
    assert code == 2
    assert "dataset_coco.json: no captioned images with split 'test'" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "k").exists()
