"""Task modules (LightningModules): what CLIP, fusion pretraining, classification, prompt learning, VQA
and captioning train and evaluate.
Importing this package registers the built-in tasks."""

from mmlightning.tasks import captioning, classification, clip, fusion_pretrain, prompt_learning, vqa  # noqa: F401  (registers)
from mmlightning.tasks.base import DataSpec, TaskModule

__all__ = ["DataSpec", "TaskModule"]
