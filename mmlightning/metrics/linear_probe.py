"""Linear-probe accuracy on frozen image features, with all training data and few-shot.

The CLIP paper's protocol: L2-regularised logistic regression (scikit-learn, L-BFGS) on
frozen features (standardised on the probe's training images), its inverse regularisation
strength C picked from a sweep by accuracy on held-out training data, never on the test set. Few-shot probes fit on k examples per class
drawn with several seeds (mean and spread reported) and pick C on k other training images
per class (a class with fewer than 2k images gives what it has).
"""

from __future__ import annotations

import warnings

import numpy as np

from mmlightning.metrics.samples import few_shot_draw

C_SWEEP = (0.01, 0.1, 1.0, 10.0, 100.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # standardised first, so that one sweep of C fits features of any scale: normalised
    # embeddings of a young model differ from each other by a few hundredths
    with warnings.catch_warnings():  # few-shot fits: "more classes than half the samples", slow convergence
        warnings.simplefilter("ignore")
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x, y)


def _pick_c(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> float:
    if not len(val_y) or len(np.unique(y)) < 2:
        return 1.0
    scores = [(_fit(x, y, c).score(val_x, val_y), -abs(np.log10(c))) for c in C_SWEEP]  # ties: the C nearest 1
    return C_SWEEP[max(range(len(C_SWEEP)), key=lambda i: scores[i])]


def _accuracy(x: np.ndarray, y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, test_x: np.ndarray,
              test_y: np.ndarray) -> tuple[float, float]:
    c = _pick_c(x, y, val_x, val_y)
    if len(np.unique(y)) < 2:  # one class drawn: the probe can only answer it
        return float(np.mean(test_y == y[0])), c
    return float(_fit(x, y, c).score(test_x, test_y)), c


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 shots: tuple[int, ...] = (1, 4, 16), seeds: int = 3, holdout: float = 0.2) -> dict[str, dict[str, float]]:
    """Test top-1 accuracy of probes fit on ``k`` images per class (for each k in ``shots``,
    mean/std over ``seeds`` draws) and on all training images (``full``; C picked on a
    ``holdout`` fraction, then refit on everything). A ``k`` larger than the smallest class
    has no row: k images per class cannot be drawn, and fewer would not be a k-shot probe."""
    results: dict[str, dict[str, float]] = {}
    classes = np.unique(train_y)
    by_class = {c: np.flatnonzero(train_y == c) for c in classes}
    smallest = min(len(ix) for ix in by_class.values())
    for k in (k for k in shots if k <= smallest):
        scores, cs = [], []
        for seed in range(seeds):
            chosen, rest = few_shot_draw(train_y, k, seed)  # C is picked on k more per class, as few-shot allows
            score, c = _accuracy(train_x[chosen], train_y[chosen], train_x[rest], train_y[rest], test_x, test_y)
            scores.append(score)
            cs.append(c)
        results[f"{k}-shot"] = {"top1": float(np.mean(scores)), "std": float(np.std(scores)), "seeds": seeds,
                                "C": max(set(cs), key=cs.count)}  # the C picked most often
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_y))
    n_val = int(len(order) * holdout)
    val, fit = order[:n_val], order[n_val:]
    c = _pick_c(train_x[fit], train_y[fit], train_x[val], train_y[val])
    results["full"] = {"top1": float(_fit(train_x, train_y, c).score(test_x, test_y)), "std": 0.0, "seeds": 1,
                       "C": c, "images": int(len(train_y))}
    return results


def raw_pixel_svm(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of scikit-learn's SVM (RBF kernel, its default C and gamma) fit on raw
    pixels: the classic reference on small image sets such as the digits (about 0.99 there)."""
    from sklearn.svm import SVC

    if len(np.unique(train_y)) < 2:  # one-shot draws of one class cannot fit an SVM
        return float(np.mean(test_y == train_y[0]))
    return float(SVC().fit(train_x, train_y).score(test_x, test_y))
