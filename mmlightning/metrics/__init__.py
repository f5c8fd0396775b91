"""Evaluation metrics as torchmetrics ``Metric``s: they gather across ranks by themselves."""

from mmlightning.metrics.retrieval import RetrievalRecall
from mmlightning.metrics.zero_shot import ZeroShotAccuracy

__all__ = ["RetrievalRecall", "ZeroShotAccuracy"]
