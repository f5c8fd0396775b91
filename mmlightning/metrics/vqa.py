"""VQA accuracy, as the official evaluation script (``vqaEval.py`` of the VQA API repository,
GT-Vision-Lab/VQA; EvalAI's copy does the same, with a regex form of the punctuation step).

A predicted answer earns ``min(1, matches / 3)`` where ``matches`` counts human answers equal
to it, averaged over the leave-one-out subsets of the human answers (so with 10 answers,
1, 2, 3 and 4+ matches score 0.3, 0.6, 0.9 and 1.0).

The script normalises the two sides differently, and so does ``answer_scores``:

- the prediction: newlines and tabs become spaces, the ends are stripped, then the punctuation
  step, then the digit/article step (lower-case, number words to digits, no a/an/the,
  contractions restored): ``normalize_answer``;
- the human answers: the punctuation step only, and only when they are not all identical;
  never stripped, lower-cased or the digit/article step. So a human "Two", "two" or "a red"
  matches no prediction at all ("two" is predicted as "2"), and ten identical "Yes" match
  nothing either. The released VQAv2 annotations are already written the way predictions
  are normalised, which is why this rarely shows on them.

Training targets are another matter: ``soft_targets`` (and the answer vocabulary the data
modules build) normalise every human answer fully, as VQAv2 practice does, so that "Two" and
"2" train the same class. Only the reported metric follows the script.

Leave-one-out leaves out one answer at a time. (The script leaves out every answer record
equal to the one left out; VQAv2's records carry distinct ``answer_id``s, so that is one.)

One deliberate difference: with a single human answer the script's leave-one-out leaves
nothing to match and scores every prediction 0; we score exact match of the two answers,
both normalised fully (datasets with one label per question).
"""

from __future__ import annotations

import functools
import re
from collections import Counter

import torch
from torchmetrics import Metric

from mmlightning.metrics.samples import concatenated, first_occurrences

# --- the tables of vqaEval.py ---------------------------------------------------------------
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# A period is deleted unless a digit follows: the pattern begins with "(?!<=\d)", a typo for
# a look-behind that never applies, so "5." loses its period while "2.5" and ".5" keep theirs.
# Reproduced as is.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # a digit-comma-digit anywhere: punctuation is deleted, not spaced
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}

# Contractions written without the apostrophe ("dont") get it back ("don't"). Most of the
# script's entries are exactly that; the rest follow as a table.
_APOSTROPHE_DROPPED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "I'm I've isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
    "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's "
    "there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's "
    "what've when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've "
    "wouldn't y'all you'd you'll you're you've"
).split()
CONTRACTIONS: dict[str, str] = {word.replace("'", ""): word for word in _APOSTROPHE_DROPPED}
# double contractions missing one of their apostrophes, and the script's odd ones out
# (including "somebody'd" -> "somebodyd", which goes the other way)
for _full, _variants in {
    "couldn't've": "couldn'tve couldnt've", "hadn't've": "hadnt've hadn'tve", "he'd've": "hed've he'dve",
    "I'd've": "Id've I'dve", "it'd've": "itd've it'dve", "mightn't've": "mightnt've mightn'tve",
    "she'd've": "shed've she'dve", "shouldn't've": "shouldnt've shouldn'tve",
    "somebody'd've": "somebodyd've somebody'dve", "someone'd've": "someoned've someone'dve",
    "something'd've": "somethingd've something'dve", "there'd've": "thered've there'dve",
    "they'd've": "theyd've they'dve", "we'd've": "wed've we'dve", "who'd've": "whod've who'dve",
    "wouldn't've": "wouldnt've wouldn'tve", "y'all'll": "yall'll y'allll",
    "y'all'd've": "yall'd've y'alld've y'all'dve", "you'd've": "youd've you'dve",
    "'ow's'at": "ow's'at 'ows'at 'ow'sat", "let's": "let's", "she's": "she's", "somebodyd": "somebody'd",
}.items():
    CONTRACTIONS.update(dict.fromkeys(_variants.split(), _full))
# The capitalised keys ("Im", "Ive", "Id've") can never match: the script looks them up after
# lower-casing. Kept, so the table stays the script's.
PERIOD_STRIP_COUNT = 32  # the script passes re.UNICODE (= 32) where re.sub takes ``count``


def _process_punctuation(text: str) -> str:
    """A punctuation mark touching a space (or any mark, once the text holds a digit-comma-digit
    like "1,000") is deleted; otherwise it becomes a space ("x-ray" -> "x ray"). The tests
    look at the text as it was before any replacement, as the script does."""
    delete_all = COMMA_STRIP.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


_punctuation = functools.lru_cache(maxsize=1 << 16)(_process_punctuation)  # human answers repeat as much


def _process_digit_article(text: str) -> str:
    """Lower-case, number words to digits, drop articles, restore contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


@functools.lru_cache(maxsize=1 << 16)  # VQAv2 training normalises 4.4M answers, mostly "yes", "no", "2"
def normalize_answer(answer: str) -> str:
    """A predicted answer as vqaEval.py compares it: newlines and tabs become spaces, the ends
    are stripped, then its punctuation and its digit/article steps run. (Human answers get
    less, see ``human_side``; training targets and the answer vocabulary use this on them.)

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    """
    return _process_digit_article(_process_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def _leave_one_out(matches: int, total: int) -> float:
    """Mean over the ``total`` leave-one-out subsets of min(1, matches-in-subset / 3): leaving
    out one of the ``matches`` agreeing answers leaves ``matches - 1``."""
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


def human_side(gt_answers: list[str]) -> list[str]:
    """The human answers as vqaEval.py compares them: the punctuation step when they are not
    all identical, else as given (no stripping, no lower-casing, no digit/article step)."""
    if len(set(gt_answers)) > 1:
        return [_punctuation(a) for a in gt_answers]
    return list(gt_answers)


def answer_scores(gt_answers: list[str]) -> dict[str, float]:
    """What vqaEval.py gives a prediction, by the prediction's normalised form: a prediction
    ``p`` earns ``answer_scores(gt_answers).get(normalize_answer(p), 0.0)``. A data module
    computes this once per question from the raw human answers.

    The keys are the human answers as the script compares them (see ``human_side``); one no
    normalised prediction can equal ("Yes", "two") is kept and simply never matched. A single
    human answer counts as exact match after full normalisation, 1.0 (the script would give
    0: leaving out the only answer leaves nothing to match). No answers give an empty dict.
    """
    if len(gt_answers) == 1:
        return {normalize_answer(gt_answers[0]): 1.0}
    counts = Counter(human_side(gt_answers))
    return {answer: _leave_one_out(n, len(gt_answers)) for answer, n in counts.items()}


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """vqaEval.py's accuracy of one predicted answer against the raw human answers (any number
    of them). With one human answer this is exact match after normalisation (see
    ``answer_scores``); with none it is 0."""
    return answer_scores(gt_answers).get(normalize_answer(prediction), 0.0)


def soft_targets(gt_answers: list[str]) -> dict[str, float]:
    """Training targets as VQAv2 practice: ``min(count / 3, 1)`` per distinct answer, every
    human answer normalised fully (unlike the metric's human side: "Two" and "2" are one
    target). A single human answer gets 1.0, as in ``answer_scores``."""
    counts = Counter(normalize_answer(a) for a in gt_answers)
    if len(gt_answers) == 1:
        return {answer: 1.0 for answer in counts}
    return {answer: min(n / 3, 1.0) for answer, n in counts.items()}


class VQAAccuracy(Metric):
    """Mean VQA accuracy overall (``acc``) and per named group (``acc_<name>``), from the
    accuracy each prediction earned (e.g. ``batch["accuracy"]`` gathered at the argmax, rows
    that the data module computed with ``answer_scores`` from the raw human answers).

    A group's value is the mean of its questions' accuracies, each the mean over its
    leave-one-out subsets: the convention of EvalAI's copy of vqaEval.py (and of the VQA API
    repository's Python 3 script, whose tables this module uses). The repository's older
    Python 2 release appends, per question and answer type, the last leave-one-out value
    instead of the question's mean, so its per-type tables (not its overall accuracy) differ
    from ours; its punctuation table differs too.

    A sample whose group is negative counts towards ``acc`` only. Groups that saw no sample
    are left out of ``compute``'s result rather than reported as 0 or nan, so a split
    without, say, "number" questions does not log a misleading value. ``acc`` is 0 before
    any update. Each question counts once by its id, whatever the distributed sampler
    repeated (``samples.py``); sums are float64: float32 loses digits over the 200k questions
    of VQAv2 val.
    """

    full_state_update = False

    def __init__(self, group_names: list[str]) -> None:
        super().__init__()
        self.group_names = list(group_names)
        for name in ("scores", "groups", "sample_ids"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, accuracy_of_prediction: torch.Tensor, group: torch.Tensor, sample_ids: torch.Tensor) -> None:
        score = accuracy_of_prediction.detach().reshape(-1).to(torch.float64)
        group, sample_ids = group.reshape(-1).long(), sample_ids.reshape(-1).long()
        if not score.shape == group.shape == sample_ids.shape:
            raise ValueError(f"VQAAccuracy.update: {score.numel()} accuracies, {group.numel()} group labels and "
                             f"{sample_ids.numel()} question ids; they must match")
        if group.numel() and int(group.max()) >= len(self.group_names):
            raise ValueError(f"VQAAccuracy.update: group {int(group.max())} out of range for "
                             f"{len(self.group_names)} groups {self.group_names}")
        self.scores.append(score)
        self.groups.append(group)
        self.sample_ids.append(sample_ids)

    def compute(self) -> dict[str, torch.Tensor]:
        long = torch.zeros(0, dtype=torch.long, device=self.device)
        _, first = first_occurrences(concatenated(self.sample_ids, long))
        score = concatenated(self.scores, long.double())[first]
        group = concatenated(self.groups, long)[first]
        out = {"acc": (score.sum() / max(len(score), 1)).float()}
        keep = group >= 0
        n = len(self.group_names)
        group_sum = torch.zeros(n, dtype=torch.float64, device=score.device).index_add_(0, group[keep], score[keep])
        group_count = torch.bincount(group[keep], minlength=n)
        for g, name in enumerate(self.group_names):
            if int(group_count[g]) > 0:
                out[f"acc_{name}"] = (group_sum[g] / group_count[g]).float()
        return out
