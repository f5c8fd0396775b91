"""Data modules over the embedded shapes world (see shapes_world.py).

Everything lives in memory as tensors and is tokenized once in ``setup``: batches are cut
by index in ``__getitems__``, so the training loop never runs Python per sample.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.common import (LabelledImages, SplitDataModule, TensorImages, ZeroShotSpec, normalize_uint8,
                                             string_ids)
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.registry import DATA_MODULES, ConfigError


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
                 num_labelled_train: int = 2400, num_labelled_test: int = 1200) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        if not 1 <= max_objects <= 3:
            raise ConfigError(f"data.max_objects must be 1, 2 or 3, got {max_objects}")
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


class ShapesQuestions(Dataset):
    """One item per (image, question). Shapes questions have one true answer, so the soft
    target and the accuracy row are both one-hot."""

    def __init__(self, split: world.ShapesSplit, answers: list[str], blind: dict[str, str], tokenizer: Any,
                 max_length: int, image_config: ImageConfig) -> None:
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
        self.blind = torch.tensor([index.get(blind.get(blind_type(q), answers[0]), 0) for _, q in items])
        self.num_answers, self.image_config = len(answers), image_config

    def __len__(self) -> int:
        return len(self.owner)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices)
        answer = self.answer[idx]
        one_hot = torch.zeros(len(idx), self.num_answers)
        known = answer >= 0
        one_hot[known.nonzero().squeeze(1), answer[known]] = 1.0
        return {
            "image": normalize_uint8(self.images[self.owner[idx]], self.image_config),
            "input_ids": self.text["input_ids"][idx],
            "attention_mask": self.text["attention_mask"][idx],
            "target": one_hot,
            "accuracy": one_hot,
            "question_type": self.family[idx],
            "blind_answer": self.blind[idx],
            "question_id": idx,
            "image_id": self.owner[idx],
            "question": [self.questions[i] for i in indices],
            "answer": [self.answer_text[i] for i in indices],
        }


def blind_type(q: world.Question) -> str:
    """What a blind model may condition on: the family and the question's first word
    ('relation is' asks yes/no, 'relation what' asks a colour)."""
    return f"{q.family} {q.question.split()[0]}"


@DATA_MODULES.register("shapes_vqa")
class ShapesVQAData(ShapesCLIPData):
    """Questions about shapes-world images (colour, shape, size, count, existence, relations).

    The answer vocabulary is the ``num_answers`` most frequent training answers. Accuracy is
    reported per question family and for relational vs non-relational questions.
    """

    question_types = list(world.QUESTION_FAMILIES)
    type_groups = {"relational": list(world.RELATIONAL_FAMILIES),
                   "non_relational": [f for f in world.QUESTION_FAMILIES if f not in world.RELATIONAL_FAMILIES]}

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, num_answers: int = 100,
                 **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        self.zero_shot = None  # classes of objects are a CLIP notion; VQA asks questions instead
        self.rendered: dict[str, world.ShapesSplit] = {}
        train = self.render("train")
        counts: dict[str, int] = {}
        for qs in train.questions:
            for q in qs:
                counts[q.answer] = counts.get(q.answer, 0) + 1
        self.answers = sorted(counts, key=lambda a: (-counts[a], a))[:num_answers]
        by_type: dict[str, dict[str, int]] = {}
        for qs in train.questions:
            for q in qs:
                tally = by_type.setdefault(blind_type(q), {})
                tally[q.answer] = tally.get(q.answer, 0) + 1
        self.blind = {t: min(tally, key=lambda a: (-tally[a], a)) for t, tally in by_type.items()}

    def render(self, split: str) -> world.ShapesSplit:
        if split not in self.rendered:
            self.rendered[split] = world.generate(split, self.sizes[split], seed=self.seed,
                                                  image_size=self.image_config.size, max_objects=self.max_objects,
                                                  heldout=self.heldout, with_questions=True)
        return self.rendered[split]

    def build_split(self, split: str) -> Dataset:
        dataset = ShapesQuestions(self.render(split), self.answers, self.blind, self.tokenizer, self.max_length,
                                  self.image_config)
        self.rendered.pop(split)  # the dataset holds what it needs
        return dataset


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
