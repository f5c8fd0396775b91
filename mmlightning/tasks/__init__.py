"""Task modules (LightningModules): what CLIP, classification, prompt learning, VQA and captioning
train and evaluate.
Importing this package registers the built-in tasks."""

from mmlightning.tasks import captioning, classification, clip, prompt_learning, vqa  # noqa: F401  (registers names)
from mmlightning.tasks.base import DataSpec, TaskModule

__all__ = ["DataSpec", "TaskModule"]
