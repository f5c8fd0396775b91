"""Data modules over the embedded shapes world (see shapes_world.py).

Everything lives in memory as tensors and is tokenized once in ``setup``: batches are cut
by index in ``__getitems__``, so the training loop never runs Python per sample.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.base import LabelledImages, ZeroShotSpec
from mmlightning.data_modules.common import SplitDataModule, TensorImages, normalize_uint8, string_ids
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES


class ShapesPairs(Dataset):
    """Training pairs: image i with its first (left-to-right) caption."""

    def __init__(self, split: world.ShapesSplit, tokenizer: Any, max_length: int, image_config: ImageConfig) -> None:
        captions = [c[0] for c in split.captions]
        self.images = torch.from_numpy(split.images)
        self.text = tokenize(tokenizer, captions, max_length)
        self.caption_id = string_ids(captions)
        self.image_config = image_config

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {
            "image": normalize_uint8(self.images[idx], self.image_config),
            "input_ids": self.text["input_ids"][idx],
            "attention_mask": self.text["attention_mask"][idx],
            "image_id": idx,
            "caption_id": self.caption_id[idx],
        }


class ShapesEval(Dataset):
    """Evaluation items: each image once, with all of its captions (see common.py)."""

    def __init__(self, split: world.ShapesSplit, tokenizer: Any, max_length: int, image_config: ImageConfig) -> None:
        self.images = torch.from_numpy(split.images)
        flat = [c for caps in split.captions for c in caps]
        self.owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
        self.text = tokenize(tokenizer, flat, max_length)
        self.caption_id = string_ids(flat)
        classes = {o: k for k, o in enumerate(world.all_objects())}
        self.label = torch.tensor([classes[s[0].combo] if len(s) == 1 else -1 for s in split.scenes])
        self.image_config = image_config

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        text_idx = torch.nonzero(torch.isin(self.owner, idx)).squeeze(1)
        return {
            "image": normalize_uint8(self.images[idx], self.image_config),
            "image_id": idx,
            "label": self.label[idx],
            "input_ids": self.text["input_ids"][text_idx],
            "attention_mask": self.text["attention_mask"][text_idx],
            "text_image_id": self.owner[text_idx],
            "caption_id": self.caption_id[text_idx],
            "text_id": text_idx,
        }


@DATA_MODULES.register("shapes_clip")
class ShapesCLIPData(SplitDataModule):
    """Image-caption pairs from the shapes world, rendered at the vision encoder's size.

    Zero-shot classes are every (size, colour, shape); the ``heldout`` group holds those
    never shown in training, so its accuracy measures generalisation.
    """

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, num_train: int = 20000,
                 num_val: int = 1000, num_test: int = 1000, seed: int = 0, max_objects: int = 3,
                 heldout: list[list[str]] | None = None, batch_size: int = 256, eval_batch_size: int = 500,
                 num_workers: int = 0, zero_shot_templates: tuple[str, ...] = ("a {}",),
                 num_labelled_train: int = 2400, num_labelled_test: int = 1200, shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        if not 1 <= max_objects <= 3:
            raise UserError(f"data.max_objects must be 1, 2 or 3, got {max_objects}")
        self.heldout = tuple(tuple(h) for h in heldout) if heldout is not None else world.DEFAULT_HELDOUT
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.seed, self.max_objects = seed, max_objects
        self.num_labelled = {"train": num_labelled_train, "test": num_labelled_test}
        objects = world.all_objects()
        self.classes = self.zero_shot = ZeroShotSpec(
            classnames=[world.object_phrase(o) for o in objects], templates=list(zero_shot_templates),
            groups={"heldout": [i for i, o in enumerate(objects) if o in self.heldout],
                    "seen": [i for i, o in enumerate(objects) if o not in self.heldout]},
        )

    def render(self, split: str) -> world.ShapesSplit:
        return world.generate(split, self.sizes[split], seed=self.seed, image_size=self.image_config.size,
                              max_objects=self.max_objects, heldout=self.heldout)

    def build_split(self, split: str) -> Dataset:
        kind = ShapesPairs if split == "train" else ShapesEval
        return kind(self.render(split), self.tokenizer, self.max_length, self.image_config)

    def labelled_images(self) -> LabelledImages:
        """One-shape scenes labelled with their (size, colour, shape), drawn from the train and
        test streams of the world with every class allowed: a probe is supervised, so it may
        see the classes that CLIP training held out."""
        index = {o: k for k, o in enumerate(world.all_objects())}

        def split(name: str) -> TensorImages:
            rendered = world.generate(name, self.num_labelled[name], seed=self.seed, image_size=self.image_config.size,
                                      max_objects=1, heldout=())
            labels = torch.tensor([index[scene[0].combo] for scene in rendered.scenes])
            return TensorImages(torch.from_numpy(rendered.images), labels, self.image_config)

        return LabelledImages("shapes", self.classes, split("train"), split("test"))


def mirror_fractions(mirror_right: float | list[float]) -> list[float]:
    """``data.mirror_right`` as one fraction per epoch (the last repeats); anything else fails
    naming the key."""
    fractions = list(mirror_right) if isinstance(mirror_right, (list, tuple)) else [mirror_right]
    if not fractions or not all(not isinstance(f, bool) and isinstance(f, (int, float)) and 0.0 <= f <= 1.0
                                for f in fractions):
        raise UserError(f"data.mirror_right must be a fraction in [0, 1] or a list of them (one per epoch), "
                          f"got {mirror_right}")
    return fractions


class ShapesQuestions(Dataset):
    """One item per (image, question). Shapes questions have one true answer, so the soft
    target and the accuracy row are both one-hot.

    ``mirror_right``: the fraction of questions saying "right" that are asked as "left" about
    the mirrored image instead (same answer: the world is mirror-symmetric); a list gives one
    fraction per epoch, the last repeating. Whether "A is left of B" and whether "A is right
    of B" flip with that one word, so on balanced data a model that has not yet found A and B
    gains nothing from the direction word, and one that ignores the word gains nothing from
    finding A and B: every fusion head stayed at chance on these questions while solving the
    rest. Tilting training towards "left" makes finding the two objects pay off on its own;
    the "right" questions teach the word once it does. Which questions come mirrored is one
    seeded draw per question, so a smaller fraction mirrors a subset of a larger one's. For
    training only.
    """

    def __init__(self, split: world.ShapesSplit, answers: list[str], blind: dict[str, str], tokenizer: Any,
                 max_length: int, image_config: ImageConfig, mirror_right: float | list[float] = 0.0,
                 seed: int = 0) -> None:
        items = [(i, q) for i, qs in enumerate(split.questions) for q in qs]
        index = {a: k for k, a in enumerate(answers)}
        self.images = torch.from_numpy(split.images)
        self.owner = torch.tensor([i for i, _ in items])
        self.questions = [q.question for _, q in items]
        self.answer_text = [q.answer for _, q in items]
        self.text = tokenize(tokenizer, self.questions, max_length)
        self.answer = torch.tensor([index.get(q.answer, -1) for _, q in items])
        self.family = torch.tensor([world.QUESTION_FAMILIES.index(q.family) for _, q in items])
        # a blind answer outside a small vocabulary falls back to the most frequent answer
        self.blind = torch.tensor([index.get(blind.get(q.family, answers[0]), 0) for _, q in items])
        self.num_answers, self.image_config = len(answers), image_config
        # Python lists, not tensors: __getitems__ runs inside the training step (no loader
        # workers), where turning tensors into Python values would count as host syncs
        self.mirror_right = mirror_fractions(mirror_right)
        self.epoch_aware = len(self.mirror_right) > 1  # ResumableSampler passes epoch * len + index
        if any(self.mirror_right):
            # one draw per question, so a smaller fraction mirrors a subset of a larger one's
            draw = torch.rand(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
            self.draw = [d if world.direction_word(q) == "right" else math.inf for d, q in zip(draw, self.questions)]
            self.mirrored_questions = [world.mirror_question(q) for q in self.questions]
            self.mirrored_text = tokenize(tokenizer, self.mirrored_questions, max_length)

    def __len__(self) -> int:
        return len(self.owner)

    def mirrored(self, indices: list[int], epochs: list[int]) -> list[bool]:
        """Which of these questions come mirrored, each in its epoch."""
        if not any(self.mirror_right):
            return [False] * len(indices)
        last = len(self.mirror_right) - 1
        return [self.draw[i] < self.mirror_right[min(e, last)] for i, e in zip(indices, epochs)]

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        n = len(self)
        epochs = [i // n for i in indices] if self.epoch_aware else [0] * len(indices)
        indices = [i % n for i in indices] if self.epoch_aware else list(indices)
        idx = torch.as_tensor(indices)
        images = self.images[self.owner[idx]]  # (B, H, W, 3)
        input_ids, attention_mask = self.text["input_ids"][idx], self.text["attention_mask"][idx]
        questions = [self.questions[i] for i in indices]
        mirror = self.mirrored(indices, epochs)
        if any(mirror):
            flip = torch.tensor(mirror)
            images = torch.where(flip[:, None, None, None], images.flip(2), images)
            input_ids = torch.where(flip[:, None], self.mirrored_text["input_ids"][idx], input_ids)
            attention_mask = torch.where(flip[:, None], self.mirrored_text["attention_mask"][idx], attention_mask)
            questions = [self.mirrored_questions[i] if m else q for i, m, q in zip(indices, mirror, questions)]
        answer = self.answer[idx]
        one_hot = torch.zeros(len(idx), self.num_answers)
        known = answer >= 0
        one_hot[known.nonzero().squeeze(1), answer[known]] = 1.0
        return {
            "image": normalize_uint8(images, self.image_config),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "target": one_hot,
            "accuracy": one_hot,
            "question_type": self.family[idx],
            "blind_answer": self.blind[idx],
            "question_id": idx,  # the question as generated, also when it came mirrored
            "image_id": self.owner[idx],
            "question": questions,
            "answer": [self.answer_text[i] for i in indices],
        }


def most_common_answers(split: world.ShapesSplit) -> dict[str, str]:
    """The most common answer of each question family in ``split``: the blind baseline."""
    by_type: dict[str, dict[str, int]] = {}
    for qs in split.questions:
        for q in qs:
            tally = by_type.setdefault(q.family, {})
            tally[q.answer] = tally.get(q.answer, 0) + 1
    return {t: min(tally, key=lambda a: (-tally[a], a)) for t, tally in by_type.items()}


class ShapesQuestionWorld(ShapesCLIPData):
    """Shapes-world scenes rendered with their questions (VQA as classification, and the
    generative VLM's conversations): ``relational_questions`` relational picks per scene in
    every split, accuracy grouped by question family and relational vs not, and the blind
    baseline from the training split."""

    question_types = list(world.QUESTION_FAMILIES)
    type_groups = {"relational": list(world.RELATIONAL_FAMILIES),
                   "non_relational": [f for f in world.QUESTION_FAMILIES if f not in world.RELATIONAL_FAMILIES]}

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, relational_questions: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        if isinstance(relational_questions, bool) or not isinstance(relational_questions, int) \
                or relational_questions < 0:
            raise UserError(f"data.relational_questions must be a whole number >= 0, got {relational_questions!r}")
        self.relational_questions = relational_questions
        self.zero_shot = None  # classes of objects are a CLIP notion; these data ask questions instead
        self.rendered: dict[str, world.ShapesSplit] = {}
        self.blind_answers = most_common_answers(self.render("train"))

    def render(self, split: str) -> world.ShapesSplit:
        if split not in self.rendered:
            self.rendered[split] = world.generate(split, self.sizes[split], seed=self.seed,
                                                  image_size=self.image_config.size, max_objects=self.max_objects,
                                                  heldout=self.heldout, with_questions=True,
                                                  relational_questions=self.relational_questions)
        return self.rendered[split]

    def take_render(self, split: str) -> world.ShapesSplit:
        """The rendered split, forgotten here: the dataset built from it holds what it needs."""
        rendered = self.render(split)
        self.rendered.pop(split)
        return rendered


@DATA_MODULES.register("shapes_vqa")
class ShapesVQAData(ShapesQuestionWorld):
    """Questions about shapes-world images (colour, shape, size, count, existence, relations).

    The answer vocabulary is the ``num_answers`` most frequent training answers. Accuracy is
    reported per question family and for relational vs non-relational questions.
    ``relational_questions``: relational picks per scene (every split); ``mirror_right``: the
    fraction of training questions saying "right" asked as "left" about the mirrored image
    (see ``ShapesQuestions``).
    """

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, num_answers: int = 100,
                 mirror_right: float | list[float] = 0.0, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        self.mirror_right = mirror_fractions(mirror_right)
        counts: dict[str, int] = {}
        for qs in self.render("train").questions:
            for q in qs:
                counts[q.answer] = counts.get(q.answer, 0) + 1
        self.answers = sorted(counts, key=lambda a: (-counts[a], a))[:num_answers]
        self.blind = self.blind_answers

    def build_split(self, split: str) -> Dataset:
        return ShapesQuestions(self.take_render(split), self.answers, self.blind, self.tokenizer, self.max_length,
                               self.image_config, self.mirror_right if split == "train" else [0.0], self.seed)


class ShapesCaptionPairs(Dataset):
    """Captioning training items: every caption of every image (left-to-right and
    right-to-left descriptions both count as right)."""

    def __init__(self, split: world.ShapesSplit, tokenizer: Any, max_length: int, image_config: ImageConfig) -> None:
        self.images = torch.from_numpy(split.images)
        self.owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
        self.text = tokenize(tokenizer, [c for caps in split.captions for c in caps], max_length)
        self.image_config = image_config

    def __len__(self) -> int:
        return len(self.owner)

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return {
            "image": normalize_uint8(self.images[self.owner[idx]], self.image_config),
            "input_ids": self.text["input_ids"][idx],
            "attention_mask": self.text["attention_mask"][idx],
            "image_id": self.owner[idx],
        }


class ShapesCaptionEval(Dataset):
    """Captioning evaluation items: each image once, with all its captions as references."""

    def __init__(self, split: world.ShapesSplit, image_config: ImageConfig) -> None:
        self.images = torch.from_numpy(split.images)
        self.references = split.captions
        self.image_config = image_config

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices)
        return {
            "image": normalize_uint8(self.images[idx], self.image_config),
            "image_id": idx,
            "references": [self.references[i] for i in indices],
        }


@DATA_MODULES.register("shapes_captions")
class ShapesCaptionData(ShapesCLIPData):
    """Shapes-world images with their captions, for captioning."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        self.zero_shot = None

    def build_split(self, split: str) -> Dataset:
        if split == "train":
            return ShapesCaptionPairs(self.render(split), self.tokenizer, self.max_length, self.image_config)
        return ShapesCaptionEval(self.render(split), self.image_config)
