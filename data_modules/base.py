"""The contract between tasks and data modules, written down once.

A task never imports a data module, and a data module never imports a task: they meet here.

**What every data module is given.** ``mml`` builds the recipe's ``data:`` node with
``DATA_MODULES.build``; its keys become keyword arguments, and the framework adds four of its
own, which every data module's ``__init__`` takes:

- ``tokenizer``, ``max_length``: the text tower's tokenizer and context length,
- ``image_config``: the vision tower's input size, mean and std (``ImageConfig``),
- ``shuffle_seed``: the run's seed, the only thing the training order depends on.

The first three come from the task (``TaskModule.data_spec``), so swapping a tower re-tokenizes
and re-sizes the data with no data key changed.

**What every data module provides** (``TaskData``): Lightning's loaders and
``train_batches_per_rank()``, which the schedule's length is computed from without building a
loader.

**Optional capabilities**, each ``None`` or empty unless a data module has it:

- ``zero_shot``: classes and prompt templates (``ZeroShotSpec``); the evaluation batches'
  ``label`` holds each image's class, and the CLIP task reports zero-shot accuracy on them.
  The classification and prompt-learning tasks take their classes from it (their data's
  batches are ``image``, ``label``, ``sample_id``: ``classification.py``).
- ``raw_pixels(split)``: each image's pixels as a flat array, where the data holds them in
  memory, for classic baselines on the same split (the classify task's SVM).
- ``labelled_images()``: images with one class label each (``LabelledImages``), for the
  zero-shot and linear-probe sections of ``mml eval``.
- ``callbacks()``: Lightning callbacks the data needs in the Trainer (e.g. the shard reader's
  bad-sample log).
- an answer vocabulary (``AnswerVocabulary``): what a VQA task sizes its classifier from.
- conversations (``Conversations``): for the generative vision-language task, whose
  ``tokenizer`` is a chat format (``encoders/chat.py``) that the data module encodes with.

Batch layouts are documented in ``common.py`` (image-text), ``vqav2.py`` (questions) and
``conversations.py`` (conversations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import lightning as L
from torch.utils.data import Dataset

from mmlightning.errors import UserError


@dataclass
class ZeroShotSpec:
    """Classes and prompt templates for zero-shot classification of evaluation images.
    ``groups`` names subsets of classes to report separately (e.g. 'heldout')."""

    classnames: list[str]
    templates: list[str]
    groups: dict[str, list[int]] = field(default_factory=dict)

    def prompts(self) -> list[list[str]]:
        return [[t.format(c) for t in self.templates] for c in self.classnames]


@dataclass
class LabelledImages:
    """One image per item with one class label, for zero-shot classification and linear
    probes (``mml eval``): ``train`` fits the probes, ``test`` scores both. Each dataset cuts
    whole batches in ``__getitems__``: ``{"image": (B,3,H,W) float, "label": (B,) long}``."""

    name: str
    classes: ZeroShotSpec
    train: Dataset
    test: Dataset
    skipped: list[str] = field(default_factory=list)  # files left out: they do not decode as images


class TaskData(L.LightningDataModule):
    """The base of every data module: what the framework gives it and what tasks may ask of it
    (see the module docstring)."""

    zero_shot: ZeroShotSpec | None = None

    def __init__(self, shuffle_seed: int = 0) -> None:
        super().__init__()
        self.shuffle_seed = int(shuffle_seed)

    @staticmethod
    def check_loader_options(spec: dict[str, Any]) -> None:
        """Batch sizes and worker counts, checked from the recipe alone: the framework calls
        this before it builds the (slow to build) model, and each data module in its
        ``__init__``."""
        batch, eval_batch = spec.get("batch_size", 1), spec.get("eval_batch_size", 1)
        if not (isinstance(batch, int) and isinstance(eval_batch, int) and batch >= 1 and eval_batch >= 1):
            raise UserError(f"data.batch_size and data.eval_batch_size must be >= 1, got {batch} and {eval_batch}.")
        workers = spec.get("num_workers", 0)
        if not isinstance(workers, int) or workers < 0:
            raise UserError(f"data.num_workers must be >= 0 (0: load in the training process), got {workers}.")

    def train_batches_per_rank(self) -> int:
        """Batches of one training epoch on this rank, without building a loader (asking
        Lightning would build the loader early and lose a resumed loader's position)."""
        raise NotImplementedError

    def labelled_images(self) -> LabelledImages | None:
        """Labelled images for ``mml eval``'s zero-shot and probe sections, if the data has them."""
        return None

    def callbacks(self) -> list[L.Callback]:
        """Callbacks this data needs in the Trainer."""
        return []


@runtime_checkable
class AnswerVocabulary(Protocol):
    """Data for VQA-style classification over answers, known once the data module is built:
    ``answers`` (the classifier's classes, in order), ``question_types`` (what the batches'
    ``question_type`` indexes; accuracy is reported per type) and ``type_groups`` (coarser
    groups of types reported as well, e.g. relational; may be empty)."""

    answers: list[str]
    question_types: list[str]
    type_groups: dict[str, list[str]]


@runtime_checkable
class Conversations(Protocol):
    """Data for the generative vision-language task (``conversations.py`` gives the batch
    layout): images with conversations for training; for evaluation, prompts whose generated
    answers are scored as VQA answers (``kind`` "vqa", by the official accuracy, per
    ``question_types`` and ``type_groups``, beside ``blind_answers``: the most common training
    answer of each question type) or as captions (``kind`` "caption", by BLEU, ROUGE-L and
    CIDEr-D)."""

    question_types: list[str]
    type_groups: dict[str, list[str]]
    blind_answers: dict[str, str]
