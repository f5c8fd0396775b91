"""Caption metrics: BLEU, ROUGE-L and CIDEr-D equal pycocoevalcap's; the Java-free tokenizer
matches the Stanford PTBTokenizer pycocoevalcap runs; collapse is visible in distinct_ratio."""

from __future__ import annotations

import random
import shutil

import pytest
import torch

from mmlightning.metrics import CaptionMetrics, caption_scores
from mmlightning.metrics.captioning import bleu, cider_d, rouge_l, tokenize_caption

VOCAB = "a an the dog cat man woman red blue small large on in of with next to sitting standing".split()


def random_set(seed: int, n_images: int = 40) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Hypotheses and references from a small vocabulary, so n-grams of all orders overlap."""
    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choices(VOCAB[:12], k=rng.randint(lo, hi)))  # noqa: E731
    refs = {i: [sentence(3, 14) for _ in range(rng.randint(1, 5))] for i in range(n_images)}
    hyps = {i: sentence(1, 12) for i in range(n_images)}
    hyps[0] = "dog"  # one-word hypothesis: no bigrams at all
    hyps[1] = refs[1][0]  # an exact copy of a reference
    hyps[2] = ""  # an empty caption (a model that stops at once)
    return hyps, refs


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_scores_equal_pycocoevalcap(seed: int) -> None:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    hyps, refs = random_set(seed, n_images=40 + 10 * seed)
    res = {i: [h] for i, h in hyps.items()}
    ref_bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)
    assert bleu(hyps, refs) == pytest.approx(ref_bleu, abs=1e-6)
    assert rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(refs, res)[0], abs=1e-6)
    assert cider_d(hyps, refs) == pytest.approx(Cider().compute_score(refs, res)[0], abs=1e-6)


def test_degenerate_sets_equal_pycocoevalcap() -> None:
    """One image (IDF is zero everywhere), and a corpus of one-word hypotheses (no 2-4-grams:
    BLEU-2..4 rest on the epsilons, and the brevity penalty is tiny)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    cases = [({7: "a red dog"}, {7: ["a red dog on a mat", "the dog"]}),
             ({i: "dog" for i in range(5)}, {i: ["a dog on a mat", "a dog"] for i in range(5)})]
    for hyps, refs in cases:
        res = {i: [h] for i, h in hyps.items()}
        assert bleu(hyps, refs) == pytest.approx(Bleu(4).compute_score(refs, res, verbose=0)[0], abs=1e-6)
        assert rouge_l(hyps, refs) == pytest.approx(Rouge().compute_score(refs, res)[0], abs=1e-6)
        assert cider_d(hyps, refs) == pytest.approx(Cider().compute_score(refs, res)[0], abs=1e-6)


def test_tokenize_caption_by_hand() -> None:
    assert tokenize_caption("A dog's toy is on the table.") == "a dog 's toy is on the table"
    assert tokenize_caption("I don't think they're here, can't you see?") == "i do n't think they 're here ca n't you see"
    assert tokenize_caption('Two "big" dogs; one (brown) -- ok...') == "two big dogs one -lrb- brown -rrb- ok"
    assert tokenize_caption("The U.S. flag costs $1,000 at 3:30 p.m.") == "the u.s. flag costs $ 1,000 at 3:30 p.m."
    assert tokenize_caption("A black-and-white photo of Mr. Smith’s cat") == "a black-and-white photo of mr. smith 's cat"
    assert tokenize_caption("  \n ") == ""


# Captions with the punctuation, case and clitics of real COCO annotations.
JAVA_CASES = [
    "A man riding a wave on top of a surfboard.", "A bathroom with a toilet, sink, and shower.",
    "Two giraffes standing next to each other in a field ", "a woman's hand holding a cell phone",
    "A kitchen that doesn't have any people in it.", "A cat laying on a bed next to a laptop .",
    "An old-fashioned train (steam engine) on the tracks.", 'A sign that reads "STOP" at an intersection.',
    "The plate has broccoli, carrots; and rice...", "A group of people at the St. Patrick's day parade.",
    "a dog's frisbee isn't on the grass", "Kids' toys are all over the floor!", "Is this a 1950's car?",
    "A man wearing a t-shirt - and jeans -- stands.", "a pizza w/ cheese and 1/2 pepperoni",
    "A clock showing 10:30 on a tower", "A giraffe that's eating leaves from a tree", "Here's a cake: chocolate.",
    "The bus is going to 5th Ave.", "They're playing tennis in the U.S. Open.", "A   man    with  a  kite",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the reference tokenizer needs Java")
def test_tokenize_caption_matches_java_ptb_tokenizer() -> None:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(JAVA_CASES)})
    assert [tokenize_caption(c) for c in JAVA_CASES] == [java[i][0] for i in range(len(JAVA_CASES))]


def test_exact_match_and_distinct_by_hand() -> None:
    predictions = {1: "A dog.", 2: "a cat on a mat", 3: "A dog"}
    references = {1: ["a dog", "A brown dog."], 2: ["The cat sits."], 3: ["a dog!", "a puppy"]}
    out = caption_scores(predictions, references)
    assert out["exact_match"] == pytest.approx(2 / 3)  # "A dog." and "A dog" both become "a dog"
    assert out["distinct_predictions"] == 2
    assert out["distinct_references"] == 4  # "a dog" twice counts once
    assert out["distinct_ratio"] == pytest.approx(2 / 3)  # / min(3 images, 4 references)
    assert set(out) >= {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"}


def test_collapse_gives_low_distinct_ratio() -> None:
    _, refs = random_set(5, n_images=50)
    collapsed = caption_scores({i: "a man on a dog" for i in refs}, refs)
    varied = caption_scores({i: r[-1] for i, r in refs.items()}, refs)
    assert collapsed["distinct_ratio"] == pytest.approx(1 / 50)
    assert varied["distinct_ratio"] == pytest.approx(1.0)
    assert varied["CIDEr-D"] > collapsed["CIDEr-D"]


def test_caption_metrics_drops_sampler_repeats() -> None:
    hyps, refs = random_set(6, n_images=10)
    metric = CaptionMetrics()
    ids = list(hyps)
    metric.update(torch.tensor(ids[:6]), [hyps[i] for i in ids[:6]], [refs[i] for i in ids[:6]])
    metric.update(ids[6:] + ids[:2], [hyps[i] for i in ids[6:] + ids[:2]], [refs[i] for i in ids[6:] + ids[:2]])
    assert metric.compute() == pytest.approx(caption_scores(hyps, refs))
    metric.reset()
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="must match"):
        metric.update([1, 2], ["a"], [["b"]])
