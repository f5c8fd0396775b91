"""VQA accuracy against the official rule (vqaEval.py): worked out by hand, and compared with a
plain re-statement of the script on randomised answer sets, per question, overall and per type."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch

from mmlightning.data_modules.vqav2 import resolve
from mmlightning.metrics import VQAAccuracy
from mmlightning.metrics.vqa import answer_scores, human_side, normalize_answer, soft_targets, vqa_accuracy


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


def test_the_two_sides_are_normalised_differently() -> None:
    # the prediction gets punctuation + digit/article; the humans punctuation only (they differ
    # here): "two." -> "two", "Two" stays, neither equals a prediction, which reads "2"
    gts = ["Two", "2", "two.", "3", "3", "3", "3", "4", "4", "1"]
    assert human_side(gts) == ["Two", "2", "two", "3", "3", "3", "3", "4", "4", "1"]
    assert vqa_accuracy("2", gts) == pytest.approx(0.3)       # 1 match: "2"
    assert vqa_accuracy("two", gts) == pytest.approx(0.3)     # predicted "two" reads "2"
    assert vqa_accuracy("three", gts) == pytest.approx(1.0)   # 4 matches
    assert vqa_accuracy("4", gts) == pytest.approx(0.6)
    assert vqa_accuracy("5", gts) == 0.0
    # unanimous humans are compared as given; the prediction is still normalised
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 0.0            # predicted "yes" != human "Yes"
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0           # unanimous: no punctuation step
    assert vqa_accuracy("yes", ["yes."] * 9 + ["no"]) == pytest.approx(1.0)  # mixed: "yes." -> "yes"
    # articles and number words of the humans stay: "a red" and "two" match nothing
    assert vqa_accuracy("a red", ["a red"] * 5 + ["red"] * 2 + ["blue"] * 3) == pytest.approx(0.6)
    assert vqa_accuracy("red", ["a red"] * 8 + ["blue"] * 2) == 0.0
    assert vqa_accuracy("2", ["two"] * 6 + ["2"] * 4) == pytest.approx(1.0)
    assert vqa_accuracy("2", ["two"] * 8 + ["2"] * 2) == pytest.approx(0.6)
    # a mark touching no space becomes a space, and the humans are not stripped afterwards
    assert human_side(["yes!", "no"]) == ["yes ", "no"]
    assert vqa_accuracy("yes", ["yes!"] * 9 + ["no"]) == 0.0
    # newlines and tabs: the prediction's become spaces and its ends go; the humans' stay
    assert vqa_accuracy("\tyes\n", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)
    assert vqa_accuracy("yes", ["yes\t"] * 9 + ["no"]) == 0.0


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
    # the metric, by the prediction's normalised form: yes 6 matches -> 1.0; "Yes" (from
    # "Yes.") 1 -> 0.3 but no normalised prediction reads "Yes"; no 2 -> 0.6; maybe 1 -> 0.3
    assert answer_scores(gts) == pytest.approx({"yes": 1.0, "Yes": 0.3, "no": 0.6, "maybe": 0.3})
    # training targets normalise the humans fully: yes 7 -> 1, no 2 -> 2/3, maybe 1 -> 1/3
    assert soft_targets(gts) == pytest.approx({"yes": 1.0, "no": 2 / 3, "maybe": 1 / 3})
    for answer in ("yes", "Yes", "no", "maybe", "blue"):
        assert answer_scores(gts).get(normalize_answer(answer), 0.0) == vqa_accuracy(answer, gts)
    assert soft_targets(["Two"]) == {"2": 1.0} and answer_scores(["Two"]) == {"2": 1.0}
    assert soft_targets(["two"] * 3) == {"2": 1.0} and answer_scores(["two"] * 3) == pytest.approx({"two": 2 / 3})
    assert answer_scores([]) == {} and soft_targets([]) == {}


def test_metric_groups() -> None:
    metric = VQAAccuracy(["number", "other", "yes/no"])
    metric.update(torch.tensor([1.0, 0.3, 0.6]), torch.tensor([2, 2, 0]), torch.tensor([10, 11, 12]))
    metric.update(torch.tensor([0.9, 0.0]), torch.tensor([2, -1]), torch.tensor([13, 14]))  # -1: overall only
    out = {k: float(v) for k, v in metric.compute().items()}
    # overall (1 + 0.3 + 0.6 + 0.9 + 0) / 5; yes/no (1 + 0.3 + 0.9) / 3; number 0.6; no "other" sample
    assert out == pytest.approx({"acc": 2.8 / 5, "acc_yes/no": 2.2 / 3, "acc_number": 0.6})
    metric.reset()
    metric.update(torch.tensor([0.5]), torch.tensor([1]), torch.tensor([10]))
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx({"acc": 0.5, "acc_other": 0.5})


def test_metric_without_groups_and_bad_groups() -> None:
    metric = VQAAccuracy([])
    metric.update(torch.tensor([0.3, 0.6]), torch.empty(2, dtype=torch.long).fill_(-1), torch.tensor([1, 2]))
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx({"acc": 0.45})
    with pytest.raises(ValueError, match="group 3 out of range"):
        VQAAccuracy(["a", "b"]).update(torch.tensor([1.0]), torch.tensor([3]), torch.tensor([1]))


def test_metric_merges_like_one_process_across_ranks() -> None:
    # merge_state applies each state's dist_reduce_fx, as the sync across ranks does; rank b
    # ends with a repeat of question 0, as DistributedSampler pads a split of 5 for 2 ranks
    one, a, b = (VQAAccuracy(["x", "y"]) for _ in range(3))
    scores, groups, ids = torch.tensor([1.0, 0.3, 0.6, 0.9]), torch.tensor([0, 1, 1, 0]), torch.arange(4)
    one.update(scores, groups, ids)
    a.update(scores[0::2], groups[0::2], ids[0::2])
    b.update(torch.cat([scores[1::2], scores[:1]]), torch.cat([groups[1::2], groups[:1]]),
             torch.cat([ids[1::2], ids[:1]]))
    a.merge_state(b)
    expected = {"acc": 2.8 / 4, "acc_x": 1.9 / 2, "acc_y": 0.9 / 2}
    assert {k: float(v) for k, v in a.compute().items()} == pytest.approx(expected)
    assert {k: float(v) for k, v in one.compute().items()} == pytest.approx(expected)


# --- vqaEval.py re-stated -------------------------------------------------------------------
# A plain transcription of the script's rules (GT-Vision-Lab/VQA, PythonEvaluationTools/
# vqaEvaluation/vqaEval.py), written apart from mmlightning.metrics.vqa so that the two can
# disagree: its tables typed out again, its loop over the leave-one-out sets kept as a loop.
REF_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've
wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all
yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've
youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
REF_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                  "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
REF_ARTICLES = ["a", "an", "the"]
REF_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
REF_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
REF_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def ref_process_punctuation(in_text: str) -> str:
    out_text = in_text
    for p in REF_PUNCT:
        if (p + " " in in_text or " " + p in in_text) or (re.search(REF_COMMA_STRIP, in_text) is not None):
            out_text = out_text.replace(p, "")
        else:
            out_text = out_text.replace(p, " ")
    return REF_PERIOD_STRIP.sub("", out_text, re.UNICODE)  # re.UNICODE lands on `count`, as in the script


def ref_process_digit_article(in_text: str) -> str:
    out_text = []
    for word in in_text.lower().split():
        word = REF_MANUAL_MAP.setdefault(word, word)
        if word not in REF_ARTICLES:
            out_text.append(word)
    for word_id, word in enumerate(out_text):
        if word in REF_CONTRACTIONS:
            out_text[word_id] = REF_CONTRACTIONS[word]
    return " ".join(out_text)


def ref_evaluate(gts: dict[int, dict], res: dict[int, str]) -> tuple[float, dict[str, float], dict[int, float]]:
    """vqaEval.evaluate: (overall, per answer type, per question), fractions rather than x100
    rounded to 2 places. ``gts[q]``: {"answers": [{"answer", "answer_id"}...], "answer_type"}."""
    gts = copy.deepcopy(gts)  # the script rewrites the human answers in place
    acc_qa, acc_ans_type, eval_qa = [], {}, {}
    for ques_id in gts:
        res_ans = res[ques_id]
        res_ans = res_ans.replace("\n", " ")
        res_ans = res_ans.replace("\t", " ")
        res_ans = res_ans.strip()
        res_ans = ref_process_punctuation(res_ans)
        res_ans = ref_process_digit_article(res_ans)
        gt_acc = []
        gt_answers = [ans["answer"] for ans in gts[ques_id]["answers"]]
        if len(set(gt_answers)) > 1:
            for ans_dic in gts[ques_id]["answers"]:
                ans_dic["answer"] = ref_process_punctuation(ans_dic["answer"])
        for gt_ans_datum in gts[ques_id]["answers"]:
            other_gt_ans = [item for item in gts[ques_id]["answers"] if item != gt_ans_datum]
            matching_ans = [item for item in other_gt_ans if item["answer"] == res_ans]
            gt_acc.append(min(1, float(len(matching_ans)) / 3))
        avg_gt_acc = float(sum(gt_acc)) / len(gt_acc)
        acc_qa.append(avg_gt_acc)
        acc_ans_type.setdefault(gts[ques_id]["answer_type"], []).append(avg_gt_acc)  # EvalAI: the mean
        eval_qa[ques_id] = avg_gt_acc
    overall = float(sum(acc_qa)) / len(acc_qa)
    return overall, {t: float(sum(v)) / len(v) for t, v in acc_ans_type.items()}, eval_qa


def ref_accuracy(prediction: str, answers: list[str]) -> float:
    records = [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]
    return ref_evaluate({0: {"answers": records, "answer_type": "other"}}, {0: prediction})[0]


# randomised answer sets: the spellings annotators use for a few true answers
SPELLINGS = {
    "2": ["2", "two", "Two", "2.", " 2", "2 ", "two!"],
    "yes": ["yes", "Yes", "yes.", "yes!", "YES", "yes ", "\tyes", "yes ."],
    "red": ["red", "Red", "a red", "the red", "red.", "red!", "(red)", "red, white", "red,white", "red-ish", "red ish"],
    "dog": ["dog", "a dog", "the dog", "Dog", "dogs", "dog?", "dog ?", "an dog"],
    "10": ["10", "ten", "Ten", "10.", "1,0", "10,000", "10000"],
    "x ray": ["x ray", "x-ray", "X-ray", "x - ray", "xray", "x_ray", "x/ray"],
    "don't": ["don't", "dont", "Dont", "do not", "don't.", "dont!"],
    "none": ["none", "None", "0", "zero", "none.", "nothing"],
    "2.5": ["2.5", "2.5.", ".5", "5.", "2 . 5", "two point five"],
}


def random_answer_sets(n: int, seed: int) -> list[tuple[str, list[str]]]:
    """(prediction, human answers) pairs: mixed sets drawn from one or two answers' spellings,
    and a share of identical sets (the script's other branch); 2 to 10 answers."""
    rng = random.Random(seed)
    keys = sorted(SPELLINGS)
    everything = [s for k in keys for s in SPELLINGS[k]]
    cases = []
    for _ in range(n):
        main, other = rng.sample(keys, 2)
        size = rng.choice([10, 10, 10, 2, 3, 5, 9])
        if rng.random() < 0.2:
            answers = [rng.choice(SPELLINGS[main])] * size
        else:
            pool = SPELLINGS[main] * 3 + SPELLINGS[other]
            answers = [rng.choice(pool) for _ in range(size)]
        prediction = rng.choice(SPELLINGS[main] + [main, rng.choice(everything)])
        cases.append((prediction, answers))
    return cases


def test_reference_is_the_script_on_hand_cases() -> None:
    # the re-statement itself, against the values worked out above
    assert ref_accuracy("dog", ten("dog", 3)) == pytest.approx(0.9)
    assert ref_accuracy("Two", ["Two", "2", "two.", "3", "3", "3", "3", "4", "4", "1"]) == pytest.approx(0.3)
    assert ref_accuracy("yes.", ["yes"] * 10) == 1.0 and ref_accuracy("yes", ["yes."] * 10) == 0.0
    assert ref_accuracy("dog", ["dog"]) == 0.0  # one human answer: the script gives 0 (we give 1, see below)


def test_matches_the_script_on_random_answer_sets() -> None:
    cases = random_answer_sets(2000, seed=0)
    differ = [(p, a, vqa_accuracy(p, a), ref_accuracy(p, a)) for p, a in cases
              if vqa_accuracy(p, a) != pytest.approx(ref_accuracy(p, a), abs=1e-12)]
    assert not differ, f"{len(differ)} of {len(cases)} differ, e.g. {differ[:3]}"
    # the sets exercise both branches of the script and all levels of agreement
    assert 200 < sum(len(set(a)) == 1 for _, a in cases) < 800
    scores = {round(ref_accuracy(p, a), 6) for p, a in cases}
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= scores and len(scores) > 8


def test_one_human_answer_is_exact_match() -> None:
    # our one deliberate difference: the script's leave-one-out leaves nothing to match
    assert vqa_accuracy("A dog.", ["dog"]) == 1.0 and vqa_accuracy("two", ["Two"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0 and ref_accuracy("dog", ["dog"]) == 0.0


def test_reported_accuracy_is_the_script_overall_and_per_type() -> None:
    """Through the VQAv2 data module's rows (computed from the raw human answers), the task's
    gather at the predicted answer and VQAAccuracy, against the script on the same predictions."""
    rng = random.Random(1)
    cases = random_answer_sets(600, seed=1)
    types = ["number", "other", "yes/no"]
    annotations = [{"question_id": q, "image_id": q, "question_type": "what is", "answer_type": rng.choice(types),
                    "multiple_choice_answer": normalize_answer(answers[0]),
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                for j, a in enumerate(answers)]}
                   for q, (_, answers) in enumerate(cases)]
    # the vocabulary is normalised answers, as answer_vocabulary builds it
    vocab = sorted({normalize_answer(s) for spellings in SPELLINGS.values() for s in spellings} - {""})
    index = {a: k for k, a in enumerate(vocab)}
    split = resolve(annotations, "annotations.json", "data.val_annotations", index, types, {})
    rows = split.accuracy.dense(torch.arange(len(cases)), len(vocab))
    prediction = torch.tensor([rng.randrange(len(vocab)) if rng.random() < 0.3 else
                               index.get(normalize_answer(p), 0) for p, _ in cases])
    score = rows.gather(1, prediction[:, None]).squeeze(1)
    metric = VQAAccuracy(types)
    metric.update(score, split.answer_type, split.question_id)
    ours = {k: float(v) for k, v in metric.compute().items()}

    gts = {a["question_id"]: a for a in annotations}
    overall, per_type, per_question = ref_evaluate(gts, {q: vocab[int(k)] for q, k in enumerate(prediction)})
    assert score.tolist() == pytest.approx([per_question[q] for q in range(len(cases))], abs=1e-6)
    assert ours == pytest.approx({"acc": overall, **{f"acc_{t}": v for t, v in per_type.items()}}, abs=1e-6)
    assert 0.1 < overall < 0.9 and set(per_type) == set(types)
