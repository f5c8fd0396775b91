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
  ``references`` (default: that last turn).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from mmlightning.data_modules import shapes_world as world
from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.common import SplitDataModule, normalize_uint8
from mmlightning.data_modules.shapes import ShapesQuestionWorld
from mmlightning.data_modules.transforms import eval_transform
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


class ConversationTrain(Dataset):
    """Encoded training conversations; ``owner[k]`` is conversation k's image. Packed ones
    (``ChatFormat.pack``) carry their ``positions`` and ``segments``."""

    def __init__(self, images: Any, owner: list[int], ids: list[list[int]], labels: list[list[int]], chat: Any,
                 positions: list[list[int]] | None = None, segments: list[list[int]] | None = None) -> None:
        self.images, self.owner, self.ids, self.labels, self.chat = images, owner, ids, labels, chat
        self.positions, self.segments = positions, segments

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        packed = {} if self.segments is None else {"positions": [self.positions[i] for i in indices],
                                                    "segments": [self.segments[i] for i in indices]}
        batch = self.chat.collate([self.ids[i] for i in indices], [self.labels[i] for i in indices], **packed)
        return {"image": self.images([self.owner[i] for i in indices]), **batch,
                "sample_id": torch.tensor([int(i) for i in indices])}


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
    the caption instead of the image. Evaluation: each image's caption prompt, scored against
    all its captions, and each of its questions, scored by VQA accuracy per question family.
    """

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig,
                 caption_prompt: str = "what objects are there", pack_per_image: int = 1, **kwargs: Any) -> None:
        super().__init__(tokenizer, max_length, image_config, **kwargs)
        if isinstance(pack_per_image, bool) or not isinstance(pack_per_image, int) or pack_per_image < 1:
            raise UserError(f"data.pack_per_image must be a whole number >= 1, got {pack_per_image!r}")
        self.caption_prompt, self.pack_per_image = caption_prompt, pack_per_image

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
        owner, ids, labels, positions, segments = [], [], [], [], []
        for i, (captions, questions) in enumerate(zip(rendered.captions, rendered.questions)):
            caption = captions[int(torch.randint(len(captions), (1,), generator=draw))]
            pairs = [(self.caption_prompt, caption)] + [(q.question, q.answer) for q in questions]
            pairs = [pairs[k] for k in torch.randperm(len(pairs), generator=draw).tolist()]
            for start in range(0, len(pairs), self.pack_per_image):
                conversations = [[user_turn(q, first=True), {"role": "assistant", "content": a}]
                                 for q, a in pairs[start:start + self.pack_per_image]]
                seq, lab, pos, seg = self.tokenizer.pack(conversations, f"data (train image {i})")
                owner.append(i), ids.append(seq), labels.append(lab), positions.append(pos), segments.append(seg)
        return ConversationTrain(images, owner, ids, labels, self.tokenizer, positions, segments)


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
            return ConversationTrain(images, owner, [e[0] for e in encoded], [e[1] for e in encoded], self.tokenizer)
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
