"""Images with conversations, for the generative vision-language task (tasks/vlm.py).

The task's ``tokenizer`` here is a chat format (``encoders/chat.py``): conversations are
encoded with it once, when a split is built, and batches are padded by it.

Training batches::

    image (B,3,H,W); input_ids, attention_mask, labels (B,T) padded on the right, labels -100
    except on the assistant's tokens; sample_id (B,)

Evaluation batches (one prompt per item, the answer to be generated)::

    image; input_ids, attention_mask (B,T) padded on the left, ending with the generation prompt;
    kind: list of "vqa" | "caption"; references: the human answers (vqa) or reference captions;
    question_type (B,) index into ``question_types`` (-1 for captions); item_id (B,) unique per
    item; prompt: the question's text, for sample tables

Sources:

- ``shapes_vlm``: the shapes world's captions and questions as conversations, by template
  (a caption answers ``caption_prompt``), so one model learns both;
- ``llava_json``: LLaVA's instruction JSON (``[{"id", "image", "conversations": [{"from":
  "human" | "gpt" | "system", "value"}, ...]}]``, ``<image>`` in the first human turn) and an
  image folder. In the evaluation files each record's last "gpt" turn is what the model must
  produce: a record with ``answers`` (the human answers) is scored as VQA, by the official
  accuracy, in its ``question_type`` if it has one; any other as a caption against
  ``references`` (default: that last turn);
- ``templated_conversations``: VQAv2 (its question/annotation JSON and COCO image folders)
  and COCO captions (Karpathy's split file), each item made a one-turn conversation by
  ``data.templates`` (LLaVA-1.5's short-answer VQA prompt and a caption prompt by default),
  so one model learns both from the formats the VQA and captioning recipes read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.coco_karpathy import check_images, read_karpathy
from mmlightning.data_modules.common import SplitDataModule, normalize_uint8
from mmlightning.data_modules.shapes import ShapesQuestionWorld, mirror_fractions
from mmlightning.data_modules.transforms import eval_transform
from mmlightning.data_modules.vqav2 import VQA_ANSWER_TYPES, human_answers, image_name, read_annotations, read_questions
from mmlightning.encoders.chat import IMAGE_PLACEHOLDER
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.errors import UserError
from mmlightning.registry import DATA_MODULES

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class TensorImageBank:
    """Images held in memory as uint8 (N, H, W, 3), normalised for the vision tower on the way out."""

    def __init__(self, images: torch.Tensor, image_config: ImageConfig) -> None:
        self.images, self.image_config = images, image_config

    def __call__(self, indices: list[int]) -> torch.Tensor:
        return normalize_uint8(self.images[torch.as_tensor(indices)], self.image_config)


class FileImageBank:
    """Image files, decoded and prepared for the vision tower (resize, centre crop) when asked."""

    def __init__(self, paths: list[Path], image_config: ImageConfig) -> None:
        self.paths, self.transform = paths, eval_transform(image_config)

    def __call__(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.transform(load_image(self.paths[i])) for i in indices])


@dataclass(frozen=True)
class TrainSequence:
    """One training sequence about image ``image``: a conversation's ids and labels, or several
    packed around the image (``ChatFormat.pack``, with their ``positions`` and ``segments``);
    the image horizontally mirrored when ``mirrored``."""

    image: int
    ids: list[int]
    labels: list[int]
    positions: list[int] | None = None
    segments: list[int] | None = None
    mirrored: bool = False


class ConversationTrain(Dataset):
    """Encoded training items, each one or more ``TrainSequence``s (a batch holds all of its
    items' sequences). ``versions[v]`` are the items of curriculum stage v and ``schedule[e]``
    the stage of epoch e, the last repeating; the epoch comes in the index (``epoch_aware``,
    ``ResumableSampler``), so a resumed run replays the same items."""

    def __init__(self, images: Any, chat: Any, versions: list[list[list[TrainSequence]]],
                 schedule: list[int] | None = None) -> None:
        self.images, self.chat, self.versions = images, chat, versions
        self.schedule = schedule or [0]
        self.epoch_aware = len(set(self.schedule)) > 1

    @classmethod
    def one_each(cls, images: Any, chat: Any, sequences: list[TrainSequence]) -> ConversationTrain:
        """Items of one sequence each, the same every epoch."""
        return cls(images, chat, [[[s] for s in sequences]])

    def __len__(self) -> int:
        return len(self.versions[0])

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        sequences, sample_ids = [], []
        for index in indices:
            epoch, item = divmod(int(index), len(self)) if self.epoch_aware else (0, int(index))
            chosen = self.versions[self.schedule[min(epoch, len(self.schedule) - 1)]][item]
            sequences += chosen
            sample_ids += [item] * len(chosen)
        packed = {} if sequences[0].segments is None else {"positions": [s.positions for s in sequences],
                                                           "segments": [s.segments for s in sequences]}
        batch = self.chat.collate([s.ids for s in sequences], [s.labels for s in sequences], **packed)
        images = self.images([s.image for s in sequences])
        if any(s.mirrored for s in sequences):
            flip = torch.tensor([s.mirrored for s in sequences])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return {"image": images, **batch, "sample_id": torch.tensor(sample_ids)}


class ConversationEval(Dataset):
    """Encoded evaluation prompts with what their answers are scored against."""

    def __init__(self, images: Any, owner: list[int], prompt_ids: list[list[int]], kind: list[str],
                 references: list[list[str]], question_type: list[int], prompt: list[str], chat: Any) -> None:
        self.images, self.owner, self.prompt_ids, self.chat = images, owner, prompt_ids, chat
        self.kind, self.references, self.question_type, self.prompt = kind, references, question_type, prompt

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        return {"image": self.images([self.owner[i] for i in indices]),
                **self.chat.collate([self.prompt_ids[i] for i in indices], left=True),
                "kind": [self.kind[i] for i in indices], "references": [self.references[i] for i in indices],
                "question_type": torch.tensor([self.question_type[i] for i in indices]),
                "item_id": torch.tensor(list(indices)), "prompt": [self.prompt[i] for i in indices]}


def user_turn(text: str, first: bool) -> dict[str, str]:
    return {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{text}" if first else text}


@DATA_MODULES.register("shapes_vlm")
class ShapesVLMData(ShapesQuestionWorld):
    """Shapes-world images with their captions and questions as conversations.

    Training: each image's caption prompt (answered by one of its captions, a seeded draw) and
    its questions, each a conversation of one turn as in evaluation, ``pack_per_image`` of them
    packed around one copy of the image (``ChatFormat.pack``: each answer sees the image and its
    own question only, the same logits as alone, for one pass over the image's 64 tokens).
    Multi-turn conversations would let a later question be answered from an earlier answer or
    the caption instead of the image. ``mirror_right`` as in ``shapes_vqa``: that fraction of
    the turns saying "right" (questions and right-to-left captions) are asked as "left" about
    the mirrored image, per epoch, in a pack of their own beside the image's unmirrored pack.
    Evaluation: each image's caption prompt, scored against all its captions, and each of its
    questions, scored by VQA accuracy per question family.
    """

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig,
                 caption_prompt: str = "what objects are there", pack_per_image: int = 1,
                 mirror_right: float | list[float] = 0.0, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        if isinstance(pack_per_image, bool) or not isinstance(pack_per_image, int) or pack_per_image < 1:
            raise UserError(f"data.pack_per_image must be a whole number >= 1, got {pack_per_image!r}")
        self.caption_prompt, self.pack_per_image = caption_prompt, pack_per_image
        self.mirror_right = mirror_fractions(mirror_right)

    def build_split(self, split: str) -> Dataset:
        rendered = self.take_render(split)
        images = TensorImageBank(torch.from_numpy(rendered.images), self.image_config)
        if split == "train":
            return self._train(rendered, images)
        owner, prompts, kind, refs, types, texts = [], [], [], [], [], []
        for i, (captions, questions) in enumerate(zip(rendered.captions, rendered.questions)):
            items = [(self.caption_prompt, "caption", captions, -1)]
            items += [(q.question, "vqa", [q.answer], self.question_types.index(q.family)) for q in questions]
            for text, what, references, family in items:
                where = f"data ({split} image {i}: {text!r})"
                prompts.append(self.tokenizer.encode_prompt([user_turn(text, first=True)], where))
                owner.append(i), kind.append(what), refs.append(references), types.append(family), texts.append(text)
        return ConversationEval(images, owner, prompts, kind, refs, types, texts, self.tokenizer)

    def _train(self, rendered: world.ShapesSplit, images: TensorImageBank) -> ConversationTrain:
        draw = torch.Generator().manual_seed(self.seed)
        turns = []  # per image: its (question, answer) turns in a seeded order, and each one's mirror draw
        for captions, questions in zip(rendered.captions, rendered.questions):
            caption = captions[int(torch.randint(len(captions), (1,), generator=draw))]
            pairs = [(self.caption_prompt, caption)] + [(q.question, q.answer) for q in questions]
            pairs = [pairs[k] for k in torch.randperm(len(pairs), generator=draw).tolist()]
            turns.append([(q, a, float(torch.rand((), generator=draw))) for q, a in pairs])
        fractions = sorted(set(self.mirror_right))
        versions = [self._packs(turns, fraction) for fraction in fractions]
        return ConversationTrain(images, self.tokenizer, versions, [fractions.index(f) for f in self.mirror_right])

    def _packs(self, turns: list[list[tuple[str, str, float]]], mirror_fraction: float) -> list[list[TrainSequence]]:
        """One item per ``pack_per_image`` turns of an image, packed around the image; those of
        them drawn for mirroring (saying "right", draw below ``mirror_fraction``) are asked as
        "left" in a second sequence, about the mirrored image."""
        items = []
        for i, image_turns in enumerate(turns):
            for start in range(0, len(image_turns), self.pack_per_image):
                item = []
                chunk = image_turns[start:start + self.pack_per_image]
                mirrored = [world.direction_word(f"{q} {a}") == "right" and d < mirror_fraction for q, a, d in chunk]
                for flip in (False, True):
                    pairs = [(world.mirror_question(q), world.mirror_question(a)) if flip else (q, a)
                             for (q, a, _), m in zip(chunk, mirrored) if m == flip]
                    if pairs:
                        conversations = [[user_turn(q, first=True), {"role": "assistant", "content": a}]
                                         for q, a in pairs]
                        where = f"data (train image {i}{', mirrored' if flip else ''})"
                        item.append(TrainSequence(i, *self.tokenizer.pack(conversations, where), mirrored=flip))
                items.append(item)
        return items


def llava_messages(record: Any, where: str) -> list[dict[str, str]]:
    """A LLaVA record's ``conversations`` as chat messages; a malformed one fails naming ``where``."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: needs a non-empty 'conversations' list of {{from, value}} turns.")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: conversations[{k}] must be {{from: human|gpt|system, value: text}}, got "
                              f"{turn!r:.80}.")
        messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
    return messages


@DATA_MODULES.register("llava_json")
class LLaVAJSONData(SplitDataModule):
    """LLaVA's instruction-tuning JSON and an image folder (see the module docstring for the
    evaluation files' ``answers``, ``question_type`` and ``references``)."""

    drop_last_train = False

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_json: str, val_json: str,
                 test_json: str, image_root: str, batch_size: int = 16, eval_batch_size: int = 32,
                 num_workers: int = 0, shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.files = {"train": Path(train_json), "val": Path(val_json), "test": Path(test_json)}
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise UserError(f"data.image_root: image folder {image_root!r} does not exist.")
        self.records = {split: self._read(split) for split in self.files}
        types = {r.get("question_type", "all") for split in ("val", "test") for r in self.records[split] if "answers" in r}
        self.question_types = sorted(types)
        self.type_groups: dict[str, list[str]] = {}
        tally: dict[str, dict[str, int]] = {}
        for r in self.records["train"]:
            if "answers" in r:
                counts = tally.setdefault(r.get("question_type", "all"), {})
                for answer in r["answers"]:
                    counts[answer] = counts.get(answer, 0) + 1
        self.blind_answers = {t: min(c, key=lambda a: (-c[a], a)) for t, c in tally.items()}

    def _read(self, split: str) -> list[dict[str, Any]]:
        path = self.files[split]
        if not path.is_file():
            raise UserError(f"data.{split}_json: {str(path)!r} does not exist.")
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"data.{split}_json: {path}: not valid JSON ({err}).") from None
        if not isinstance(records, list) or not records:
            raise UserError(f"data.{split}_json: {path}: expected a non-empty list of LLaVA records.")
        for k, r in enumerate(records):
            if not isinstance(r, dict) or not isinstance(r.get("image"), str):
                raise UserError(f"{path}: record {k} (id {r.get('id') if isinstance(r, dict) else None!r}) needs an "
                                  f"'image' path under data.image_root.")
            answers = r.get("answers")
            if answers is not None and (not isinstance(answers, list) or not all(isinstance(a, str) for a in answers)):
                raise UserError(f"{path}: record {k} (id {r.get('id')!r}): 'answers' must be a list of strings.")
        return records

    def build_split(self, split: str) -> Dataset:
        path, records = self.files[split], self.records[split]
        paths, index = [], {}
        for r in records:
            if r["image"] not in index:
                index[r["image"]] = len(paths)
                paths.append(self.image_root / r["image"])
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"{path}: {len(missing)} image file(s) missing under {self.image_root}, e.g. {missing[0]}.")
        images = FileImageBank(paths, self.image_config)
        owner = [index[r["image"]] for r in records]
        wheres = [f"{path}: record {k} (id {r.get('id')!r})" for k, r in enumerate(records)]
        if split == "train":
            encoded = [self.tokenizer.encode(llava_messages(r, w), w) for r, w in zip(records, wheres)]
            return ConversationTrain.one_each(images, self.tokenizer,
                                              [TrainSequence(o, ids, labels) for o, (ids, labels) in zip(owner, encoded)])
        prompts, kind, refs, types, texts = [], [], [], [], []
        for r, where in zip(records, wheres):
            messages = llava_messages(r, where)
            last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None:
                raise UserError(f"{where}: an evaluation record needs a final 'gpt' turn: the answer to score.")
            prompts.append(self.tokenizer.encode_prompt(messages[:last], where))
            is_vqa = "answers" in r
            kind.append("vqa" if is_vqa else "caption")
            refs.append(list(r["answers"]) if is_vqa else list(r.get("references") or [messages[last]["content"]]))
            types.append(self.question_types.index(r.get("question_type", "all")) if is_vqa else -1)
            texts.append(messages[last - 1]["content"].replace(IMAGE_PLACEHOLDER, "").strip())
        return ConversationEval(images, owner, prompts, kind, refs, types, texts, self.tokenizer)


VQAV2_KEYS = ("questions", "annotations", "images")


@dataclass
class TemplatedItem:
    image: Path
    prompt: str  # the user's text, the image placeholder not included
    answer: str  # what training teaches (VQA: the multiple-choice answer; captions: one caption)
    kind: str  # "vqa" or "caption"
    references: list[str]  # the human answers or reference captions it is scored against
    answer_type: str = ""


@DATA_MODULES.register("templated_conversations")
class TemplatedConversationData(SplitDataModule):
    """VQA and captioning data made conversations by template, for one model that does both.

    ``vqav2``: ``{train|val|test}_{questions,annotations,images}`` as the ``vqav2`` data module
    takes them (test defaults to val: the test-dev answers are not public); ``coco_karpathy``:
    ``{json_path, image_root, train_splits}``. Either or both. Each VQA question becomes
    ``templates.vqa`` with ``{question}`` filled in, answered in training by its
    multiple-choice answer and scored by the official accuracy against the ten human answers,
    per answer type; each caption becomes ``templates.caption`` answered by that caption
    (training) or scored against all of the image's captions.
    """

    drop_last_train = False

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig,
                 vqav2: dict[str, str] | None = None, coco_karpathy: dict[str, Any] | None = None,
                 templates: dict[str, str] | None = None, batch_size: int = 16, eval_batch_size: int = 32,
                 num_workers: int = 0, shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        if not vqav2 and not coco_karpathy:
            raise UserError("data: templated_conversations needs data.vqav2 (VQAv2 files) or data.coco_karpathy "
                              "(a Karpathy split file and image folder), or both.")
        self.templates = {"vqa": "{question}\nAnswer the question using a single word or phrase.",
                          "caption": "Describe the image briefly.", **(templates or {})}
        unknown = sorted(set(self.templates) - {"vqa", "caption"})
        if unknown or "{question}" not in self.templates["vqa"]:
            raise UserError(f"data.templates: give 'vqa' (with {{question}}) and/or 'caption'; got "
                              f"{dict(self.templates)}.")
        self.vqav2 = dict(vqav2 or {})
        if vqav2:
            self.vqa_files = {split: self._vqav2_files(split) for split in ("train", "val", "test")}
        self.karpathy = dict(coco_karpathy or {})
        if coco_karpathy:
            missing = [k for k in ("json_path", "image_root") if k not in self.karpathy]
            if missing:
                raise UserError(f"data.coco_karpathy needs {', '.join(missing)} (a Karpathy split file and its "
                                  f"image folder).")
        self.type_groups: dict[str, list[str]] = {}
        self.items = {"train": self._items("train")}
        seen = {item.answer_type for item in self.items["train"] if item.kind == "vqa"}
        self.question_types = sorted(set(VQA_ANSWER_TYPES) | seen) if vqav2 else []
        tally: dict[str, dict[str, int]] = {}
        for item in self.items["train"]:
            if item.kind == "vqa":
                counts = tally.setdefault(item.answer_type, {})
                counts[item.answer] = counts.get(item.answer, 0) + 1
        self.blind_answers = {t: min(c, key=lambda a: (-c[a], a)) for t, c in tally.items()}

    def _vqav2_files(self, split: str) -> tuple[str, str, str]:
        keys = [f"{split}_{k}" for k in VQAV2_KEYS]
        given = [k for k in keys if self.vqav2.get(k)]
        if split == "test" and not given:
            return self._vqav2_files("val")
        if len(given) < 3:
            raise UserError(f"data.vqav2 needs {', '.join(k for k in keys if k not in given)} beside "
                              f"{', '.join(given) or 'nothing'} (the {split} questions, annotations and image folder).")
        for key in keys:
            path = Path(self.vqav2[key])
            if not (path.is_dir() if key.endswith("images") else path.is_file()):
                raise UserError(f"data.vqav2.{key}: {str(path)!r} does not exist.")
        return tuple(self.vqav2[k] for k in keys)

    def _items(self, split: str) -> list[TemplatedItem]:
        items: list[TemplatedItem] = []
        if self.vqav2:
            questions_path, annotations_path, root = self.vqa_files[split]
            subtype, questions = read_questions(questions_path, f"data.vqav2.{split}_questions")
            for i, ann in enumerate(read_annotations(annotations_path, f"data.vqav2.{split}_annotations")):
                if ann["question_id"] not in questions:
                    raise UserError(f"data.vqav2.{split}_annotations: {annotations_path}: annotations[{i}] is for "
                                      f"question_id {ann['question_id']}, which is not in {questions_path}.")
                image_id, question = questions[ann["question_id"]]
                items.append(TemplatedItem(Path(root) / image_name(subtype, image_id),
                                           self.templates["vqa"].format(question=question),
                                           ann["multiple_choice_answer"], "vqa", human_answers(ann), ann["answer_type"]))
        if self.karpathy:
            json_path, image_root = self.karpathy["json_path"], self.karpathy["image_root"]
            splits = read_karpathy(json_path, image_root)
            wanted = list(self.karpathy.get("train_splits", ("train", "restval"))) if split == "train" else [split]
            images = [img for s in wanted for img in splits.get(s, []) if img.captions]
            check_images(json_path, image_root, images)
            for img in images:
                captions = img.captions if split == "train" else img.captions[:1]  # evaluation: one prompt per image
                items += [TemplatedItem(img.path, self.templates["caption"], c, "caption", img.captions)
                          for c in captions]
        missing = sorted({str(item.image) for item in items if not item.image.is_file()})
        if missing:
            raise UserError(f"data ({split}): {len(missing)} image file(s) missing, e.g. {missing[0]}.")
        if not items:
            raise UserError(f"data: no {split} items in data.vqav2 / data.coco_karpathy.")
        return items

    def build_split(self, split: str) -> Dataset:
        items = self.items.pop(split, None) or self._items(split)
        paths, index = [], {}
        for item in items:
            if item.image not in index:
                index[item.image] = len(paths)
                paths.append(item.image)
        images, owner = FileImageBank(paths, self.image_config), [index[item.image] for item in items]
        if split == "train":
            sequences = []
            for k, item in enumerate(items):
                messages = [user_turn(item.prompt, first=True), {"role": "assistant", "content": item.answer}]
                sequences.append(TrainSequence(owner[k], *self.tokenizer.encode(messages, f"data (train item {k})")))
            return ConversationTrain.one_each(images, self.tokenizer, sequences)
        prompts = [self.tokenizer.encode_prompt([user_turn(item.prompt, first=True)], f"data ({split} item {k})")
                   for k, item in enumerate(items)]
        unknown = sorted({item.answer_type for item in items if item.kind == "vqa"} - set(self.question_types))
        if unknown:
            raise UserError(f"data.vqav2.{split}_annotations: answer_type {unknown[0]!r} does not occur in training; "
                              f"known: {', '.join(self.question_types)}.")
        types = [self.question_types.index(item.answer_type) if item.kind == "vqa" else -1 for item in items]
        return ConversationEval(images, owner, prompts, [item.kind for item in items],
                                [item.references for item in items], types, [item.prompt for item in items],
                                self.tokenizer)
