"""COCO caption metrics without Java: BLEU-1..4, ROUGE-L and CIDEr-D.

The scores equal pycocoevalcap's ``Bleu(4)``, ``Rouge()`` and ``Cider()`` on the same
tokenised captions (tested to 1e-6), so numbers compare with published COCO results.
pycocoevalcap tokenises with Stanford CoreNLP's PTBTokenizer, which needs Java;
``tokenize_caption`` is a pure-Python stand-in that gives the same tokens on ordinary
captions (see its docstring for where it can differ).

``caption_scores`` adds two collapse detectors: how many distinct captions the model
wrote, and how often it reproduced a reference word for word.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch

# pycocoevalcap/tokenizer/ptbtokenizer.py drops these tokens after tokenising. The bracket
# escapes are upper case but the Java tokenizer lower-cases them ("-lrb-"), so brackets
# survive in pycocoevalcap's output, and in ours.
PTB_PUNCTUATIONS = frozenset({"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                              ".", "?", "!", ",", ":", "-", "--", "...", ";"})

# characters rewritten before splitting: unicode quotes and dashes as PTB normalises them,
# brackets as PTB escapes them (each becomes its own token)
_CHAR_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201c": " '' ", "\u201d": " '' ", "\u201e": " '' ",
    '"': " '' ", "`": " ` ", "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ",
    "(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- ",
})
_BRACKETS = frozenset({"-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"})
_SPLITS = [  # (pattern, replacement) applied in order to the lower-cased line
    (re.compile(r"\.{2,}"), " ... "),
    (re.compile(r"-{2,}"), " -- "),
    (re.compile(r"[!?]+"), r" \g<0> "),  # a run stays one token: "!!" and "?!" are kept
    (re.compile(r"[;$%#]"), r" \g<0> "),
    (re.compile(r"(?<!\d)[,:]|[,:](?!\d)"), r" \g<0> "),  # but 1,000 and 3:30 stay whole
    (re.compile(r"(\d:\d\d)([ap]\.?m\b)"), r"\1 \2"),  # 10:00am -> 10:00 am (5pm stays)
    (re.compile(r"(\d)'(\d)"), r"\1 '\2"),  # 5'10 -> 5 '10
    (re.compile(r"(?<=\S)/(?=\s|$)"), " /"),  # w/ -> w / (and/or stays)
    (re.compile(r"\b(gon|wan)(na)\b|\b(got)(ta)\b|\b(can)(not)\b|\b(gim|lem)(me)\b"),
     lambda m: " ".join(g for g in m.groups() if g)),
    (re.compile(r"\by'all\b"), "y' all"),
    (re.compile(r"(?<=\w)'n'(?=\w)"), " 'n' "),  # rock'n'roll
    (re.compile(r"(?<!\S)'t(is|was)\b"), r"'t \1"),
]
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'re|'ve|'ll|'d)$")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc co corp ltd mt ave rd blvd prof gen sgt capt lt col gov sen rep "
    "rev ft dept est sq tel univ cf al bros jan feb aug sept oct nov dec".split())
_INITIALS = re.compile(r"(?:[a-z]\.)*[a-z]")  # a. / u.s.a. / e.g. keep their final period
_KEEP_WHOLE = frozenset({"'n'", "'em", "'cause", "'t", "ol'", "y'", "'s", "'m", "'re", "'ve", "'ll", "'d", "n't"})
_DECADE = re.compile(r"'\d\ds?")  # '90s


def _split_chunk(chunk: str) -> list[str]:
    """One whitespace-separated chunk -> PTB tokens (quotes, hyphens, periods, clitics)."""
    if chunk in _BRACKETS or chunk in _KEEP_WHOLE or len(chunk) == 1:
        return [chunk]
    head: list[str] = []
    while len(chunk) > 1 and chunk[0] in "'-" and chunk not in _KEEP_WHOLE and not _DECADE.fullmatch(chunk):
        head.append(chunk[0])
        chunk = chunk[1:]
    tail: list[str] = []
    while len(chunk) > 1 and chunk not in _KEEP_WHOLE:
        if chunk[-1] in "'-":
            tail.insert(0, chunk[-1])
        elif chunk[-1] == "." and not (_INITIALS.fullmatch(chunk[:-1]) or chunk[:-1] in _ABBREVIATIONS):
            tail.insert(0, ".")
        elif m := _CLITIC.match(chunk):
            tail.insert(0, m.group(2))  # "i'd've": 've first, then 'd
        else:
            break
        chunk = chunk[:-len(tail[0])]
    return head + [chunk] + tail


def tokenize_caption(text: str) -> str:
    """Tokenise a caption as pycocoevalcap does before scoring, without Java.

    pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (``-lowerCase -preserveLines``)
    and drops punctuation tokens. This reproduces it: lower case; commas, colons,
    semicolons, ``$ % # &``, quotes and sentence periods split off and dropped ("dog." ->
    "dog"); clitics split ("dog's" -> "dog 's", "don't" -> "do n't", "can't" -> "ca n't",
    "cannot" -> "can not", "gonna" -> "gon na"); brackets become ``-lrb-`` etc. and stay
    (the Java output keeps them too); "!!" and "?!" stay, as in Java. Numbers ("1,000",
    "3.5", "3:30"), hyphenated words, initials ("u.s.", "e.g.", "p.m.") and common
    abbreviations ("st.", "mr.") keep their inner punctuation.

    It is an approximation: the Java lexer has hundreds of rules, so rare constructs can
    differ — abbreviations outside the built-in list ("approx." is split by both, "no." is
    kept by Java only before a number), "&" between capitals ("AT&T"), URLs, e-mail
    addresses, emoticons, clitics glued to hyphens ("cat's-eye"), feet-and-inches ("6'2\""),
    and non-ASCII punctuation other than curly quotes, dashes and the ellipsis. On plain
    captions the tokens agree (tests compare with the Java tokenizer when Java is present).
    """
    line = text.replace("\n", " ")
    line = re.sub(r"(?<![A-Z])&|&(?![A-Z])", " & ", line)  # before lower-casing: AT&T stays
    line = line.lower().translate(_CHAR_MAP)
    for pattern, replacement in _SPLITS:
        line = pattern.sub(replacement, line)
    tokens = [t for chunk in line.split() for t in _split_chunk(chunk)]
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATIONS)


# ----------------------------------------------------------------------------- n-grams


def _ngram_counts(words: Sequence[str], n: int = 4) -> list[Counter]:
    """counts[k] maps each (k+1)-gram to its count."""
    return [Counter(tuple(words[i:i + k]) for i in range(len(words) - k + 1)) for k in range(1, n + 1)]


def _check_keys(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]) -> list[Hashable]:
    if set(hyps) != set(refs):
        missing, extra = set(hyps) - set(refs), set(refs) - set(hyps)
        raise ValueError(f"hypotheses and references must cover the same ids: {len(missing)} id(s) have no "
                         f"references (e.g. {next(iter(missing), None)!r}), {len(extra)} have no hypothesis "
                         f"(e.g. {next(iter(extra), None)!r}).")
    empty = [i for i in refs if not refs[i]]
    if empty:
        raise ValueError(f"{len(empty)} id(s) have an empty reference list, e.g. {empty[0]!r}.")
    if not hyps:
        raise ValueError("no captions to score.")
    return list(hyps)


# ----------------------------------------------------------------------------- BLEU

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's: a zero match count still gives 0, never 0/0


def bleu(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n over tokenised captions, as pycocoevalcap ``Bleu(n)``: clipped n-gram
    matches and candidate n-grams summed over the corpus; the reference length of each
    caption is the one closest to its length (the shorter on a tie); one brevity penalty."""
    correct, guess = [0] * n, [0] * n
    hyp_len = ref_len = 0
    for key in _check_keys(hyps, refs):
        words = hyps[key].split()
        ref_words = [r.split() for r in refs[key]]
        max_ref = [Counter() for _ in range(n)]
        for ref in ref_words:
            for k, counts in enumerate(_ngram_counts(ref, n)):
                max_ref[k] |= counts  # Counter union = element-wise max
        for k, counts in enumerate(_ngram_counts(words, n)):
            correct[k] += sum(min(c, max_ref[k][g]) for g, c in counts.items())
            guess[k] += max(0, len(words) - k)
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    scores, precision_product = [], 1.0
    for k in range(n):
        precision_product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
        scores.append(precision_product ** (1.0 / (k + 1)))  # geometric mean of p_1..p_k
    ratio = (hyp_len + _TINY) / (ref_len + _SMALL)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * penalty for s in scores]


# ----------------------------------------------------------------------------- ROUGE-L


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, bit-parallel (Hyyro 2004): one big-int operation
    per token of ``b`` instead of a len(a) x len(b) table."""
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], beta: float = 1.2) -> float:
    """Mean over images of ROUGE-L F (beta 1.2), as pycocoevalcap ``Rouge``: precision and
    recall are each the best over the image's references (possibly from different ones)."""
    total = 0.0
    keys = _check_keys(hyps, refs)
    for key in keys:
        # split(" ") as pycocoevalcap: an empty caption is one empty token, not none
        cand = hyps[key].split(" ")
        lcs = [(_lcs_length(r, cand), len(r)) for r in (ref.split(" ") for ref in refs[key])]
        precision = max(m / len(cand) for m, _ in lcs)
        recall = max(m / length for m, length in lcs)
        if precision and recall:
            total += (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return total / len(keys)


# ----------------------------------------------------------------------------- CIDEr-D


def cider_d(hyps: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]], n: int = 4,
            sigma: float = 6.0) -> float:
    """CIDEr-D as pycocoevalcap ``Cider`` computes it (what COCO reports as "CIDEr").

    Each caption becomes one TF-IDF vector per n-gram order; document frequency counts the
    images whose references contain the n-gram, over the evaluated set only, and IDF is
    log(#images) - log(max(1, df)). Per reference: cosine similarity with the candidate's
    weights clipped at the reference's, times a Gaussian length penalty (sigma 6); averaged
    over orders and references, times 10, then averaged over images.
    """
    keys = _check_keys(hyps, refs)
    hyp_counts = {k: _ngram_counts(hyps[k].split(), n) for k in keys}
    ref_counts = {k: [_ngram_counts(r.split(), n) for r in refs[k]] for k in keys}
    df: Counter = Counter()
    for per_ref in ref_counts.values():
        df.update({g for counts in per_ref for order in counts for g in order})
    log_images = math.log(len(keys))

    def tfidf(counts: list[Counter]) -> tuple[list[dict], list[float], int]:
        vec = [{g: tf * (log_images - math.log(max(1.0, df[g]))) for g, tf in order.items()} for order in counts]
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in vec]
        # pycocoevalcap's length is the bigram count (its `if n == 1` indexes orders from 0),
        # i.e. max(words - 1, 0); only captions of 0 vs 1 words see the difference
        return vec, norms, sum(counts[1].values()) if n > 1 else 0

    total = 0.0
    for key in keys:
        h_vec, h_norm, h_len = tfidf(hyp_counts[key])
        score = 0.0
        for counts in ref_counts[key]:
            r_vec, r_norm, r_len = tfidf(counts)
            penalty = math.exp(-((h_len - r_len) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, r_vec[k].get(g, 0.0)) * r_vec[k].get(g, 0.0) for g, w in h_vec[k].items())
                if h_norm[k] and r_norm[k]:
                    dot /= h_norm[k] * r_norm[k]
                score += dot * penalty
        total += 10.0 * score / n / len(refs[key])
    return total / len(keys)


# ----------------------------------------------------------------------------- all together


def caption_scores(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
    """Tokenise (``tokenize_caption``) and score one caption per image against its references.

    Besides BLEU-1..4, ROUGE-L and CIDEr-D: ``exact_match``, the fraction of images whose
    caption equals one of its references after tokenising; ``distinct_predictions`` and
    ``distinct_references``, the number of different captions; and ``distinct_ratio`` =
    distinct predictions / min(#images, distinct references), near 1 for a model that
    describes each image and near 0 for one that writes the same caption for every image.
    """
    keys = _check_keys(predictions, references)
    hyps = {k: tokenize_caption(predictions[k]) for k in keys}
    refs = {k: [tokenize_caption(r) for r in references[k]] for k in keys}
    out = {f"BLEU-{k + 1}": s for k, s in enumerate(bleu(hyps, refs))}
    out["ROUGE-L"] = rouge_l(hyps, refs)
    out["CIDEr-D"] = cider_d(hyps, refs)
    out["exact_match"] = sum(hyps[k] in refs[k] for k in keys) / len(keys)
    distinct_refs = len({r for rs in refs.values() for r in rs})
    out["distinct_predictions"] = float(len(set(hyps.values())))
    out["distinct_references"] = float(distinct_refs)
    out["distinct_ratio"] = out["distinct_predictions"] / max(1, min(len(keys), distinct_refs))
    return out


class CaptionMetrics:
    """Collects generated captions over an evaluation epoch and scores them (``caption_scores``).

    Not a torchmetrics ``Metric``: its states can only be tensors, and these are strings.
    ``compute`` gathers every rank's captions with ``all_gather_object`` and keeps each image
    once (distributed samplers pad the last batch with repeated images). Call ``reset`` at
    the end of each epoch.
    """

    def __init__(self) -> None:
        self.items: list[tuple[Any, str, list[str]]] = []

    def update(self, image_ids: Sequence[int] | torch.Tensor, predictions: Sequence[str],
               references: Sequence[Sequence[str]]) -> None:
        ids = image_ids.tolist() if isinstance(image_ids, torch.Tensor) else list(image_ids)
        if not len(ids) == len(predictions) == len(references):
            raise ValueError(f"CaptionMetrics.update: {len(ids)} image ids, {len(predictions)} predictions and "
                             f"{len(references)} reference lists; they must match.")
        self.items.extend((i, str(p), [str(r) for r in rs]) for i, p, rs in zip(ids, predictions, references))

    def compute(self, allow_empty: bool = False) -> dict[str, float]:
        """The scores over every rank's captions; with ``allow_empty``, {} when there were none
        (evaluation data that mixes captions with other items may hold none)."""
        items = self.items
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, items)
            items = [item for rank_items in gathered for item in rank_items]
        predictions: dict[Any, str] = {}
        references: dict[Any, list[str]] = {}
        for image_id, prediction, refs in items:
            if image_id not in predictions:  # first occurrence wins; repeats are sampler padding
                predictions[image_id], references[image_id] = prediction, refs
        if not predictions and allow_empty:
            return {}
        if not predictions:
            raise ValueError("CaptionMetrics.compute called before any update.")
        return caption_scores(predictions, references)

    def reset(self) -> None:
        self.items = []
