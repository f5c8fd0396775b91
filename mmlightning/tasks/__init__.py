"""Task modules (LightningModules): what CLIP, fusion pretraining, classification, prompt learning, VQA,
captioning and generative vision-language models train and evaluate.
Importing this package registers the built-in tasks."""

from mmlightning.tasks import captioning, classification, clip, fusion_pretrain, prompt_learning, vlm, vqa  # noqa: F401  (registers)
from mmlightning.tasks.base import DataSpec, TaskModule

__all__ = ["DataSpec", "TaskModule"]
