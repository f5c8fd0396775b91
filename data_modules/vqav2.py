"""VQAv2 data: the official question and annotation JSON files and COCO image folders.

    data:
      name: vqav2
      train_questions: vqa/v2_OpenEnded_mscoco_train2014_questions.json
      train_annotations: vqa/v2_mscoco_train2014_annotations.json
      train_images: coco/train2014          # COCO_train2014_<image_id:012d>.jpg
      val_questions: ...  val_annotations: ...  val_images: coco/val2014

The answer vocabulary is the ``num_answers`` most frequent normalised answers of the training
annotations (3129 is the usual VQAv2 size). Every batch, training or evaluation, holds:

    image (B,3,H,W) float, input_ids/attention_mask (B,T) question tokens,
    target (B,A) soft scores min(count/3, 1) over the A answers (human answers normalised fully),
    accuracy (B,A) the accuracy vqaEval.py gives a prediction of each answer (from the raw
        human answers, normalised as the script does: see metrics/vqa.py),
    question_type (B,) index into ``question_types`` (the answer types: number, other, yes/no),
    blind_answer (B,) the most common training answer for the question's fine type
    ("what color is the"), question_id (B,), image_id (B,), question (list[str]),
    answer (list[str]) the multiple-choice answer.

Answers outside the vocabulary cannot be predicted and have no column: the accuracy rows hold
what the classifier can reach. Rows are stored sparsely (a few answers per question) and made
dense per batch; 3129 floats for each of 443k training questions would take 5.5 GB.

The test split defaults to val: the test-dev/test-std answers are not public (submit to
EvalAI for those).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmlightning.data_modules.coco import load_image
from mmlightning.data_modules.common import SplitDataModule
from mmlightning.data_modules.streams import decode_image
from mmlightning.data_modules.tables import read_rows, row_image, table_kind
from mmlightning.data_modules.transforms import apply_transform, eval_transform, train_transform
from mmlightning.encoders.outputs import ImageConfig
from mmlightning.encoders.tokenizers import tokenize
from mmlightning.errors import UserError
from mmlightning.metrics.vqa import answer_scores, normalize_answer, soft_targets
from mmlightning.registry import DATA_MODULES

QUESTION_FIELDS = {"image_id": int, "question": str, "question_id": int}
VQA_ANSWER_TYPES = ("number", "other", "yes/no")
ANNOTATION_FIELDS = {"question_id": int, "image_id": int, "question_type": str, "answer_type": str,
                     "multiple_choice_answer": str, "answers": list}


# ------------------------------------------------------------------ reading and checking the files
def read_json(path: str | Path, key: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_bytes())
    except ValueError as err:  # bad JSON or bad UTF-8
        raise UserError(f"{key}: {path} is not valid JSON ({err}).") from None


def check_entry(entry: Any, fields: dict[str, type], where: str) -> None:
    if not isinstance(entry, dict):
        raise UserError(f"{where} should be an object with {', '.join(fields)}; it is a {type(entry).__name__}.")
    missing = [k for k in fields if k not in entry]
    if missing:
        raise UserError(f"{where} lacks {', '.join(map(repr, missing))} (it has {', '.join(map(repr, entry))}).")
    for k, kind in fields.items():  # bool is an int to Python, never an id here
        if not isinstance(entry[k], kind) or (kind is int and isinstance(entry[k], bool)):
            raise UserError(f"{where}: {k!r} should be {kind.__name__}, got {entry[k]!r}.")


def read_questions(path: str | Path, key: str) -> tuple[str, dict[int, tuple[int, str]]]:
    """``data_subtype`` (it names the images) and question_id -> (image_id, question)."""
    data = read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise UserError(f"{key}: {path} should hold a top-level list 'questions' (VQAv2 questions layout).")
    subtype = data.get("data_subtype")
    if not isinstance(subtype, str) or not subtype:
        raise UserError(f"{key}: {path} lacks 'data_subtype' (e.g. 'train2014'), which names the images "
                          f"COCO_<data_subtype>_<image_id:012d>.jpg.")
    questions: dict[int, tuple[int, str]] = {}
    for i, q in enumerate(data["questions"]):
        check_entry(q, QUESTION_FIELDS, f"{key}: {path}: questions[{i}]")
        if q["question_id"] in questions:
            raise UserError(f"{key}: {path}: questions[{i}] repeats question_id {q['question_id']}.")
        questions[q["question_id"]] = (q["image_id"], q["question"])
    return subtype, questions


def read_annotations(path: str | Path, key: str) -> list[dict[str, Any]]:
    data = read_json(path, key)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{key}: {path} should hold a top-level list 'annotations' (VQAv2 annotations layout).")
    seen: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"{key}: {path}: annotations[{i}]"
        check_entry(ann, ANNOTATION_FIELDS, where)
        if not ann["answers"]:
            raise UserError(f"{where}: 'answers' is empty.")
        for j, a in enumerate(ann["answers"]):
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise UserError(f"{where}: answers[{j}] should be an object with a string 'answer', got {a!r}.")
        if ann["question_id"] in seen:
            raise UserError(f"{where} repeats question_id {ann['question_id']}.")
        seen.add(ann["question_id"])
    return data["annotations"]


def image_name(subtype: str, image_id: int) -> str:
    return f"COCO_{subtype}_{image_id:012d}.jpg"


def human_answers(ann: dict[str, Any]) -> list[str]:
    return [a["answer"] for a in ann["answers"]]


def answer_vocabulary(annotations: list[dict[str, Any]], num_answers: int) -> list[str]:
    """The most frequent normalised answers, counting every annotator's answer; ties go
    alphabetically so the vocabulary, and the classifier's rows, are the same every run."""
    counts = Counter(normalize_answer(a) for ann in annotations for a in human_answers(ann))
    counts.pop("", None)  # "a", "?" normalise to nothing: no answer
    return sorted(counts, key=lambda a: (-counts[a], a))[:num_answers]


def blind_answers(annotations: list[dict[str, Any]], index: dict[str, int]) -> dict[str, int]:
    """For each fine question type, the vocabulary answer annotators gave most often to its
    training questions (ties: the more frequent answer overall)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for ann in annotations:
        tally = by_type[ann["question_type"]]
        tally.update(index[n] for n in map(normalize_answer, human_answers(ann)) if n in index)
    return {t: min(tally, key=lambda k: (-tally[k], k)) for t, tally in by_type.items() if tally}


# ------------------------------------------------------------------ one split, answers resolved
@dataclass
class SparseRows:
    """One row per question over the answer vocabulary, only its non-zero entries (CSR)."""

    ptr: torch.Tensor  # (N+1,) row i is entries ptr[i]:ptr[i+1]
    col: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_dicts(cls, rows: list[dict[int, float]]) -> SparseRows:
        lengths = torch.tensor([0] + [len(r) for r in rows])
        return cls(lengths.cumsum(0), torch.tensor([k for r in rows for k in r], dtype=torch.long),
                   torch.tensor([v for r in rows for v in r.values()], dtype=torch.float32))

    def dense(self, idx: torch.Tensor, width: int) -> torch.Tensor:
        start, length = self.ptr[idx], self.ptr[idx + 1] - self.ptr[idx]
        row = torch.repeat_interleave(torch.arange(len(idx)), length)
        # entry k of the batch's concatenated rows sits at start[row] + (k - where that row begins)
        shift = torch.repeat_interleave(start - (length.cumsum(0) - length), length)
        flat = torch.arange(int(length.sum())) + shift
        out = torch.zeros(len(idx), width)
        out[row, self.col[flat]] = self.val[flat]
        return out


@dataclass
class AnnotatedSplit:
    """What batches need from one annotations file, in the file's order."""

    question_id: torch.Tensor
    image_id: torch.Tensor
    answer_type: torch.Tensor  # index into question_types
    blind: torch.Tensor  # index into the answers
    answer: list[str]  # multiple_choice_answer
    accuracy: SparseRows
    target: SparseRows


def resolve(annotations: list[dict[str, Any]], path: str, key: str, index: dict[str, int],
            question_types: list[str], blind: dict[str, int]) -> AnnotatedSplit:
    types = {t: k for k, t in enumerate(question_types)}
    for i, ann in enumerate(annotations):
        if ann["answer_type"] not in types:
            raise UserError(f"{key}: {path}: annotations[{i}] has answer_type {ann['answer_type']!r}, neither one "
                            f"of VQAv2's ({', '.join(VQA_ANSWER_TYPES)}) nor one the training annotations use "
                            f"(known: {', '.join(question_types)}).")

    def in_vocab(scores: dict[str, float]) -> dict[int, float]:
        return {index[a]: s for a, s in scores.items() if a in index and s > 0}

    # the metric's rows: vqaEval.py normalises the predicted string (a vocabulary answer) and
    # compares it with the human answers as it processes them (see metrics.vqa.answer_scores)
    predicted_as: dict[str, list[int]] = defaultdict(list)
    for answer, k in index.items():
        predicted_as[normalize_answer(answer)].append(k)

    def official(scores: dict[str, float]) -> dict[int, float]:
        return {k: s for a, s in scores.items() if s > 0 for k in predicted_as.get(a, ())}

    fallback = 0  # the most frequent answer overall
    return AnnotatedSplit(
        question_id=torch.tensor([a["question_id"] for a in annotations], dtype=torch.long),
        image_id=torch.tensor([a["image_id"] for a in annotations], dtype=torch.long),
        answer_type=torch.tensor([types[a["answer_type"]] for a in annotations], dtype=torch.long),
        blind=torch.tensor([blind.get(a["question_type"], fallback) for a in annotations], dtype=torch.long),
        answer=[a["multiple_choice_answer"] for a in annotations],
        accuracy=SparseRows.from_dicts([official(answer_scores(human_answers(a))) for a in annotations]),
        target=SparseRows.from_dicts([in_vocab(soft_targets(human_answers(a))) for a in annotations]),
    )


class CocoImages:
    """Question i's image: ``COCO_<subtype>_<image_id:012d>.jpg`` under the image folder."""

    def __init__(self, root: Path, subtype: str, image_ids: list[int]) -> None:
        self.root, self.subtype, self.image_ids = root, subtype, image_ids

    def __call__(self, question: int) -> Image.Image:
        return load_image(self.root / image_name(self.subtype, self.image_ids[question]))


class VQAQuestions(Dataset):
    """One item per question; ``__getitems__`` builds a whole batch (see the module doc).
    ``image(i)`` opens question i's image."""

    def __init__(self, split: AnnotatedSplit, questions: list[str], image: Callable[[int], Image.Image],
                 text: dict[str, torch.Tensor], num_answers: int, transform: Any) -> None:
        self.split, self.questions, self.text, self.image = split, questions, text, image
        self.num_answers, self.transform = num_answers, transform

    def __len__(self) -> int:
        return len(self.questions)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        mask = self.text["attention_mask"][idx]
        columns = mask.any(0)  # tokenized once for the whole split: drop padding no question in this batch needs
        s = self.split
        return {
            "image": torch.stack([apply_transform(self.transform, self.image(int(i)), i) for i in indices]),
            "input_ids": self.text["input_ids"][idx][:, columns],
            "attention_mask": mask[:, columns],
            "target": s.target.dense(idx, self.num_answers),
            "accuracy": s.accuracy.dense(idx, self.num_answers),
            "question_type": s.answer_type[idx],
            "blind_answer": s.blind[idx],
            "question_id": s.question_id[idx],
            "image_id": s.image_id[idx],
            "question": [self.questions[i] for i in indices],
            "answer": [s.answer[i] for i in indices],
        }


# ------------------------------------------------------------------ the data modules
class VQAData(SplitDataModule):
    """What VQA data modules share: the answer vocabulary, answer types and blind answers,
    learnt from the training annotations (VQAv2's annotation entries, however they were read),
    and each split's answers resolved against them."""

    def learn_answers(self, train: list[dict[str, Any]], num_answers: int, where: str) -> None:
        if isinstance(num_answers, bool) or not isinstance(num_answers, int) or num_answers < 1:
            raise UserError(f"data.num_answers must be a positive integer, got {num_answers!r}")
        self.answers: list[str] = answer_vocabulary(train, num_answers)
        if not self.answers:
            raise UserError(f"{where} has no non-empty answer.")
        self.answer_index = {a: k for k, a in enumerate(self.answers)}
        # VQAv2's three answer types, and any other the training file uses: a subset of VQAv2
        # may lack one in training yet have it in validation; a type with no question in a
        # split is left out of that split's metrics
        self.question_types: list[str] = sorted(set(VQA_ANSWER_TYPES) | {a["answer_type"] for a in train})
        self.type_groups: dict[str, list[str]] = {}  # VQAv2's answer types need no coarser grouping
        self.blind = blind_answers(train, self.answer_index)

    def resolve_split(self, annotations: list[dict[str, Any]], path: str, key: str) -> AnnotatedSplit:
        return resolve(annotations, path, key, self.answer_index, self.question_types, self.blind)

    def questions_dataset(self, split: str, annotated: AnnotatedSplit, texts: list[str],
                          image: Callable[[int], Image.Image]) -> VQAQuestions:
        transform = train_transform(self.image_config) if split == "train" else eval_transform(self.image_config)
        return VQAQuestions(annotated, texts, image, tokenize(self.tokenizer, texts, self.max_length),
                            len(self.answers), transform)


# ------------------------------------------------------------------ the data module
@DATA_MODULES.register("vqav2")
class VQAv2Data(VQAData):
    """VQAv2 (or any data in its file layout) with COCO images.

    ``answers`` and ``question_types`` are known after ``__init__`` (it reads the training
    annotations only), so the task can size its classifier before any image is touched.
    """

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_questions: str,
                 train_annotations: str, train_images: str, val_questions: str, val_annotations: str, val_images: str,
                 test_questions: str | None = None, test_annotations: str | None = None, test_images: str | None = None,
                 num_answers: int = 3129, batch_size: int = 64, eval_batch_size: int = 128, num_workers: int = 0, shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        test = {"test_questions": test_questions, "test_annotations": test_annotations, "test_images": test_images}
        given = [k for k, v in test.items() if v is not None]
        if given and len(given) < 3:
            raise UserError(f"data: {', '.join(given)} given without {', '.join(k for k in test if k not in given)}; "
                              f"give all three test files, or none to test on val. (VQAv2 test-dev answers are not "
                              f"public: evaluate those on EvalAI.)")
        self.files = {"train": (train_questions, train_annotations, train_images),
                      "val": (val_questions, val_annotations, val_images),
                      "test": (test_questions, test_annotations, test_images) if given else
                              (val_questions, val_annotations, val_images)}
        for split, paths in self.files.items():  # a typo fails now, not after a training epoch
            for kind, path in zip(("questions", "annotations", "images"), paths):
                exists = Path(path).is_dir() if kind == "images" else Path(path).is_file()
                if not exists:
                    raise UserError(f"data.{split}_{kind}: {'folder' if kind == 'images' else 'file'} "
                                      f"{str(path)!r} does not exist.")
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config

        train = read_annotations(train_annotations, "data.train_annotations")
        self.learn_answers(train, num_answers, f"data.train_annotations: {train_annotations}")
        # resolve the training annotations now, so their JSON (GBs of Python objects) is freed
        self.annotated = {"train": self._resolve(train, "train")}

    def _resolve(self, annotations: list[dict[str, Any]], split: str) -> AnnotatedSplit:
        return self.resolve_split(annotations, str(self.files[split][1]), f"data.{split}_annotations")

    def build_split(self, split: str) -> VQAQuestions:
        questions_path, annotations_path, image_root = self.files[split]
        q_key, a_key = f"data.{split}_questions", f"data.{split}_annotations"
        annotated = self.annotated.pop(split, None)
        if annotated is None:
            annotated = self._resolve(read_annotations(annotations_path, a_key), split)
        subtype, questions = read_questions(questions_path, q_key)
        texts = []
        for i, (qid, image_id) in enumerate(zip(annotated.question_id.tolist(), annotated.image_id.tolist())):
            if qid not in questions:
                raise UserError(f"{a_key}: {annotations_path}: annotations[{i}] is for question_id {qid}, "
                                  f"which is not in {questions_path}.")
            if questions[qid][0] != image_id:
                raise UserError(f"{a_key}: {annotations_path}: annotations[{i}] (question_id {qid}) has image_id "
                                  f"{image_id}, but {questions_path} says {questions[qid][0]}.")
            texts.append(questions[qid][1])
        if len(questions) > len(texts):
            unanswered = next(iter(set(questions) - set(annotated.question_id.tolist())))
            raise UserError(f"{q_key}: {len(questions) - len(texts)} question(s) of {questions_path} have no "
                              f"annotation in {annotations_path}, e.g. question_id {unanswered}.")
        root = Path(image_root)
        present = set(os.listdir(root))
        missing = sorted(n for n in {image_name(subtype, i) for i in annotated.image_id.tolist()} if n not in present)
        if missing:
            raise UserError(f"data.{split}_images: {len(missing)} image file(s) named by {questions_path} are "
                              f"missing under {root}, e.g. {missing[0]}.")
        return self.questions_dataset(split, annotated, texts, CocoImages(root, subtype, annotated.image_id.tolist()))

    def setup(self, stage: str | None = None) -> None:
        if stage == "test" and self.files["test"] == self.files["val"] and "val" in self.datasets:
            self.datasets["test"] = self.datasets["val"]  # testing on val: read it once
        super().setup(stage)


class ImageCells:
    """Question i's image from a table: each image's cell once (bytes, ``datasets``' Image
    struct, or a path), and which image each question asks about."""

    def __init__(self, cells: list[Any], where: list[str], roots: list[str], column: str,
                 image_of_question: list[int]) -> None:
        self.cells, self.where, self.roots, self.column = cells, where, roots, column
        self.image_of_question = image_of_question

    def __call__(self, question: int) -> Image.Image:
        image = self.image_of_question[question]
        return decode_image(row_image(self.cells[image], self.where[image], self.column, self.roots[image]))


def answer_type_of(answer: str) -> str:
    """VQAv2's answer types for a table without them: yes/no, number, other."""
    normalized = normalize_answer(answer)
    return "yes/no" if normalized in ("yes", "no") else "number" if normalized.isdigit() else "other"


@DATA_MODULES.register("vqa_table")
class VQATableData(VQAData):
    """Questions in a table of any form ``table_captions`` reads (CSV/TSV, Parquet, a
    ``save_to_disk`` or imagefolder folder): one row per question with ``image_key`` (bytes or
    a path relative to ``image_root``), ``question_key``, and ``answers_key`` (the annotators'
    answers as a list, VQAv2's ten; a single string counts as ten identical answers).
    Optional ``answer_key`` (the one answer shown in sample tables, VQAv2's
    multiple_choice_answer; default the most common of the answers), ``answer_type_key``
    (yes/no, number, other: derived from the answers when absent) and ``question_type_key`` (the fine type the blind baseline groups by; default the answer
    type). Batches, vocabulary and metrics are those of ``vqav2``; rows that share an image
    cell share an ``image_id``."""

    def __init__(self, tokenizer: Any, max_length: int, image_config: ImageConfig, train_data: str,
                 val_data: str, test_data: str | None = None, image_key: str = "image", question_key: str = "question",
                 answers_key: str = "answers", answer_key: str | None = None, answer_type_key: str | None = None,
                 question_type_key: str | None = None, image_root: str | None = None, sep: str | None = None,
                 hub_splits: dict[str, str] | None = None, num_answers: int = 3129, batch_size: int = 64,
                 eval_batch_size: int = 128, num_workers: int = 0,
                 shuffle_seed: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, shuffle_seed)
        self.specs = {"train": train_data, "val": val_data, "test": test_data or val_data}
        for split in ("train", "val"):
            if not self.specs[split]:
                raise UserError(f"data.{split}_data: name the table of {split} questions.")
            table_kind(self.specs[split], f"data.{split}_data")  # a typo fails now
        self.keys = {"image_key": image_key, "question_key": question_key, "answers_key": answers_key,
                     **({"answer_key": answer_key} if answer_key else {}),
                     **({"answer_type_key": answer_type_key} if answer_type_key else {}),
                     **({"question_type_key": question_type_key} if question_type_key else {})}
        self.image_root, self.sep = image_root, sep
        self.hub_splits = {"train": "train", "val": "validation", "test": "validation", **(hub_splits or {})}
        self.tokenizer, self.max_length, self.image_config = tokenizer, max_length, image_config
        self.tables = {"train": self.read_table("train")}
        self.learn_answers(self.tables["train"][0], num_answers, f"data.train_data: {train_data}")

    def read_table(self, split: str) -> tuple[list[dict[str, Any]], list[str], ImageCells]:
        """VQAv2 annotation entries, questions and images of one split's table."""
        key = f"data.{split}_data"
        rows, where, roots = read_rows(self.specs[split], key, self.keys, self.sep, self.hub_splits[split])
        if not rows:
            raise UserError(f"{key}: {self.specs[split]} has no rows.")
        image_ids: dict[Any, int] = {}
        first_row: list[int] = []  # each image's first row: where its cell is read from
        annotations, questions = [], []
        for i, (row, at) in enumerate(zip(rows, where)):
            answers, question = row[self.keys["answers_key"]], row[self.keys["question_key"]]
            if isinstance(answers, str):
                answers = [answers] * 10
            if not isinstance(answers, (list, tuple)) or not answers or not all(isinstance(a, str) for a in answers):
                raise UserError(f"{key}: {at}: {self.keys['answers_key']!r} should be a non-empty list of strings "
                                f"(or one string), got {answers!r}.")
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{key}: {at}: {self.keys['question_key']!r} should be a question, got {question!r}.")
            cell = row[self.keys["image_key"]]
            ident = (cell.get("bytes") or cell.get("path")) if isinstance(cell, dict) else cell
            if ident not in image_ids:
                image_ids[ident] = len(image_ids)
                first_row.append(i)
            shown = row.get(self.keys.get("answer_key", ""), None) or Counter(answers).most_common(1)[0][0]
            answer_type = row.get(self.keys.get("answer_type_key", ""), None) or answer_type_of(shown)
            annotations.append({"question_id": i, "image_id": image_ids[ident],
                                "question_type": row.get(self.keys.get("question_type_key", ""), None) or answer_type,
                                "answer_type": answer_type, "multiple_choice_answer": shown,
                                "answers": [{"answer": a} for a in answers]})
            questions.append(question.strip())
        images = ImageCells([rows[r][self.keys["image_key"]] for r in first_row], [where[r] for r in first_row],
                            [self.image_root or roots[r] for r in first_row], self.keys["image_key"],
                            [a["image_id"] for a in annotations])
        return annotations, questions, images

    def build_split(self, split: str) -> VQAQuestions:
        annotations, questions, images = self.tables.pop(split, None) or self.read_table(split)
        annotated = self.resolve_split(annotations, str(self.specs[split]), f"data.{split}_data")
        return self.questions_dataset(split, annotated, questions, images)

    def setup(self, stage: str | None = None) -> None:
        if stage == "test" and self.specs["test"] == self.specs["val"] and "val" in self.datasets:
            self.datasets["test"] = self.datasets["val"]
        super().setup(stage)
