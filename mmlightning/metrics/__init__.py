"""Evaluation metrics. Tensor metrics are torchmetrics ``Metric``s, which gather across ranks by
themselves; ``CaptionMetrics`` holds strings and gathers them with ``all_gather_object``."""

from mmlightning.metrics.captioning import CaptionMetrics, caption_scores
from mmlightning.metrics.retrieval import RetrievalRecall
from mmlightning.metrics.vqa import VQAAccuracy
from mmlightning.metrics.classification import TopKAccuracy

__all__ = ["CaptionMetrics", "caption_scores", "RetrievalRecall", "VQAAccuracy", "TopKAccuracy"]
