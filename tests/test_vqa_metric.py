"""VQA accuracy against the official rule (vqaEval.py), worked out by hand."""

from __future__ import annotations

import pytest
import torch

from mmlightning.metrics import VQAAccuracy
from mmlightning.metrics.vqa import answer_scores, normalize_answer, soft_targets, vqa_accuracy


@pytest.mark.parametrize("raw, expected", [
    ("yes", "yes"),
    ("Yes.", "yes"),             # lower-cased; a period not followed by a digit is deleted
    ("yes!", "yes"),             # '!' touches no space: becomes a space, then split away
    ("yes !", "yes"),            # ' !' touches a space: deleted
    ("two", "2"),
    ("Ten", "10"),
    ("none", "0"),
    ("a dog", "dog"),            # articles go
    ("The Red Car", "red car"),
    ("an apple", "apple"),
    ("dont", "don't"),           # contractions written without the apostrophe get it back
    ("don't", "don't"),          # the apostrophe is not punctuation in vqaEval.py
    ("youre", "you're"),
    ("1,000", "1000"),           # digit-comma-digit: every punctuation mark is deleted
    ("2.5", "2.5"),              # a period before a digit stays
    ("5.", "5"),
    (".5", ".5"),                # the script's look-behind is a typo: only the digit after counts
    ("x-ray", "x ray"),          # a hyphen inside a word becomes a space
    ("t - shirt", "t shirt"),    # ' -' touches a space: deleted, and the double space collapses
    ("left/right", "left right"),
    ("red, white", "red white"),  # ', ' touches a space: deleted
    ("  two\tdogs\n", "2 dogs"),   # tabs and newlines are spaces, ends stripped
    ("a  b", "b"),               # 'a' is an article even here
    ("", ""),
])
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_comma_strip_deletes_other_marks_too() -> None:
    # with a digit-comma-digit anywhere, '-' is deleted instead of spaced: "1,000-ish" -> "1000ish"
    assert normalize_answer("1,000-ish") == "1000ish"
    assert normalize_answer("100-ish") == "100 ish"


def ten(answer: str, matches: int, other: str = "cat") -> list[str]:
    return [answer] * matches + [other] * (10 - matches)


@pytest.mark.parametrize("matches, expected", [
    # 10 answers, m of them match. Leaving out a matching answer leaves m-1 matches, leaving
    # out another leaves m: acc = (m*min(1,(m-1)/3) + (10-m)*min(1,m/3)) / 10
    (0, 0.0),
    (1, 0.3),   # (1*0 + 9*1/3) / 10
    (2, 0.6),   # (2*1/3 + 8*2/3) / 10 = (2/3 + 16/3) / 10
    (3, 0.9),   # (3*2/3 + 7*1) / 10
    (4, 1.0),   # (4*1 + 6*1) / 10
    (10, 1.0),
])
def test_ten_answers(matches: int, expected: float) -> None:
    assert vqa_accuracy("dog", ten("dog", matches)) == pytest.approx(expected)


def test_normalisation_applies_to_both_sides() -> None:
    # "Two", "2", "two." are one answer after normalisation: 3 matches of 10 -> 0.9
    gts = ["Two", "2", "two.", "3", "3", "3", "3", "4", "4", "1"]
    assert vqa_accuracy("2", gts) == pytest.approx(0.9)
    assert vqa_accuracy("two", gts) == pytest.approx(0.9)
    assert vqa_accuracy("three", gts) == pytest.approx(1.0)   # 4 matches
    assert vqa_accuracy("4", gts) == pytest.approx(0.6)
    assert vqa_accuracy("5", gts) == 0.0
    # a raw prediction against unanimous raw answers: 1.0 here (the script itself would give 0)
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0


def test_fewer_than_ten_answers() -> None:
    # 5 answers, 2 match: (2*min(1,1/3) + 3*min(1,2/3)) / 5 = (2/3 + 2) / 5 = 8/15
    assert vqa_accuracy("dog", ["dog", "dog", "cat", "cat", "cow"]) == pytest.approx(8 / 15)
    # 3 answers, all match: each subset of 2 has 2 matches -> 2/3
    assert vqa_accuracy("dog", ["dog"] * 3) == pytest.approx(2 / 3)
    # 2 answers, 1 matches: (1*0 + 1*1/3) / 2 = 1/6
    assert vqa_accuracy("dog", ["dog", "cat"]) == pytest.approx(1 / 6)
    # one answer: exact match after normalisation (the script's rule would give 0)
    assert vqa_accuracy("A dog.", ["dog"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("dog", []) == 0.0


def test_answer_scores_and_soft_targets() -> None:
    gts = ["yes"] * 6 + ["Yes."] + ["no"] * 2 + ["maybe"]
    # yes: 7 matches -> 1.0; no: 2 -> 0.6; maybe: 1 -> 0.3
    assert answer_scores(gts) == pytest.approx({"yes": 1.0, "no": 0.6, "maybe": 0.3})
    # min(count/3, 1): 7 -> 1, 2 -> 2/3, 1 -> 1/3
    assert soft_targets(gts) == pytest.approx({"yes": 1.0, "no": 2 / 3, "maybe": 1 / 3})
    for answer in ("yes", "no", "maybe", "blue"):
        assert answer_scores(gts).get(answer, 0.0) == vqa_accuracy(answer, gts)
    assert soft_targets(["dog"]) == {"dog": 1.0}
    assert answer_scores([]) == {} and soft_targets([]) == {}


def test_metric_groups() -> None:
    metric = VQAAccuracy(["number", "other", "yes/no"])
    metric.update(torch.tensor([1.0, 0.3, 0.6]), torch.tensor([2, 2, 0]))
    metric.update(torch.tensor([0.9, 0.0]), torch.tensor([2, -1]))  # -1: overall only
    out = {k: float(v) for k, v in metric.compute().items()}
    # overall (1 + 0.3 + 0.6 + 0.9 + 0) / 5; yes/no (1 + 0.3 + 0.9) / 3; number 0.6; no "other" sample
    assert out == pytest.approx({"acc": 2.8 / 5, "acc_yes/no": 2.2 / 3, "acc_number": 0.6})
    metric.reset()
    metric.update(torch.tensor([0.5]), torch.tensor([1]))
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx({"acc": 0.5, "acc_other": 0.5})


def test_metric_without_groups_and_bad_groups() -> None:
    metric = VQAAccuracy([])
    metric.update(torch.tensor([0.3, 0.6]), torch.empty(2, dtype=torch.long).fill_(-1))
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx({"acc": 0.45})
    with pytest.raises(ValueError, match="group 3 out of range"):
        VQAAccuracy(["a", "b"]).update(torch.tensor([1.0]), torch.tensor([3]))


def test_metric_merges_like_one_process_across_ranks() -> None:
    # merge_state applies each state's dist_reduce_fx, as the sync across ranks does
    one, a, b = (VQAAccuracy(["x", "y"]) for _ in range(3))
    scores, groups = torch.tensor([1.0, 0.3, 0.6, 0.9]), torch.tensor([0, 1, 1, 0])
    one.update(scores, groups)
    a.update(scores[:2], groups[:2])
    b.update(scores[2:], groups[2:])
    a.merge_state(b)
    expected = {"acc": 2.8 / 4, "acc_x": 1.9 / 2, "acc_y": 0.9 / 2}
    assert {k: float(v) for k, v in a.compute().items()} == pytest.approx(expected)
    assert {k: float(v) for k, v in one.compute().items()} == pytest.approx(expected)
