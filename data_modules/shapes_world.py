"""The shapes world: procedural images of coloured shapes with captions and questions.

It ships with the project so every recipe trains with no download. One seed fixes a whole
split; splits use separate random streams, so train, val and test never share a scene.
Objects whose (size, colour, shape) is in ``heldout`` never appear in the training split,
so zero-shot classification of them measures composition, not memory.

Pure numpy, no torch: 20,000 64x64 images render in a few seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmlightning.registry import VOCABULARIES

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (4.0, 5.5), "large": (8.0, 10.0)}  # radius range in pixels at 64 px
NUMBER_WORDS = ("zero", "one", "two", "three")
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}

# (size, colour, shape) combinations never shown in training: one per colour, spread over
# shapes and sizes so each attribute value is still seen in other combinations.
DEFAULT_HELDOUT = (
    ("large", "red", "circle"),
    ("small", "green", "square"),
    ("large", "blue", "triangle"),
    ("small", "yellow", "cross"),
    ("small", "purple", "circle"),
    ("large", "cyan", "square"),
)

# relative_position: "is the cross left of the circle" (yes/no); neighbour_colour: "what colour
# is the object left of the square" (the nearest object on that side)
QUESTION_FAMILIES = ("colour", "shape", "size", "count", "exist", "relative_position", "neighbour_colour")
RELATIONAL_FAMILIES = ("relative_position", "neighbour_colour")


def all_objects() -> list[tuple[str, str, str]]:
    """Every (size, colour, shape) combination, in a fixed order: the zero-shot classes."""
    return [(s, c, sh) for s in SIZES for c in COLOURS for sh in SHAPES]


def object_phrase(obj: tuple[str, str, str]) -> str:
    return " ".join(obj)


@VOCABULARIES.register("shapes")
def vocabulary() -> list[str]:
    """Every word a caption, question, answer or prompt of this world can contain."""
    words = set(SIZES) | set(COLOURS) | set(SHAPES) | set(NUMBER_WORDS)
    words |= {s + "s" for s in SHAPES} | {str(i) for i in range(4)}
    words |= set("a an the of is are there what how many left right yes no colour shape size "
                 "object objects picture to and".split())
    return sorted(words)


@dataclass
class Shape:
    size: str
    colour: str
    shape: str
    x: float
    y: float
    radius: float

    @property
    def combo(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)


@dataclass
class Question:
    question: str
    answer: str
    family: str


@dataclass
class ShapesSplit:
    images: np.ndarray  # (N, H, W, 3) uint8
    scenes: list[list[Shape]]  # objects sorted left to right
    captions: list[list[str]]  # several per image; [0] is the left-to-right one
    questions: list[list[Question]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.scenes)


def caption_variants(scene: list[Shape]) -> list[str]:
    """Left-to-right and right-to-left descriptions of a scene (identical for one object)."""
    phrases = [f"a {object_phrase(o.combo)}" for o in scene]
    left_to_right = " left of ".join(phrases)
    right_to_left = " right of ".join(reversed(phrases))
    return [left_to_right] if len(scene) == 1 else [left_to_right, right_to_left]


def questions_for(scene: list[Shape], rng: np.random.Generator, relational: int = 1) -> list[Question]:
    """One question per non-relational family where the scene allows it, and ``relational``
    picks of two objects and a direction, each asking whether the first is on that side of
    the second and what colour the nearest object on that side of the second is. Answers are
    single words."""
    qs: list[Question] = []
    shapes = [o.shape for o in scene]
    colours = [o.colour for o in scene]

    def unique(o: Shape) -> str | None:
        """The shortest phrase naming o and nothing else in this scene; None when another
        object looks exactly like it. (Colour and shape alone are not enough: a small and a
        large red circle would both be "the red circle", and a question about one of them
        would have no single answer.)"""
        if shapes.count(o.shape) == 1:
            return o.shape
        if colours.count(o.colour) == 1:
            return f"{o.colour} object"
        if sum(p.colour == o.colour and p.shape == o.shape for p in scene) == 1:
            return f"{o.colour} {o.shape}"
        if sum(p.combo == o.combo for p in scene) == 1:
            return f"{o.size} {o.colour} {o.shape}"
        return None

    o = scene[rng.integers(len(scene))]
    name = o.shape if shapes.count(o.shape) == 1 else unique(o)
    if name:
        qs.append(Question(f"what colour is the {name}", o.colour, "colour"))
    o = scene[rng.integers(len(scene))]
    name = o.colour + " object" if colours.count(o.colour) == 1 else unique(o)
    if name:
        qs.append(Question(f"what shape is the {name}", o.shape, "shape"))
    o = scene[rng.integers(len(scene))]
    name = unique(o)
    if name:
        qs.append(Question(f"what size is the {name}", o.size, "size"))
    if rng.random() < 0.5:
        c = list(COLOURS)[rng.integers(len(COLOURS))]
        qs.append(Question(f"how many {c} objects are there", str(colours.count(c)), "count"))
    else:
        s = SHAPES[rng.integers(len(SHAPES))]
        qs.append(Question(f"how many {s}s are there", str(shapes.count(s)), "count"))
    c, s = list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
    if rng.random() < 0.5:  # balance yes/no: ask about an object that is there
        o = scene[rng.integers(len(scene))]
        c, s = o.colour, o.shape
    present = any(o.colour == c and o.shape == s for o in scene)
    qs.append(Question(f"is there a {c} {s}", "yes" if present else "no", "exist"))
    # relational questions: up to `relational` (first, second, direction) picks, no repeats
    picks = [(i, j, rel) for i in range(len(scene)) for j in range(len(scene)) if i != j for rel in ("left", "right")]
    asked: set[str] = set()
    for p in rng.permutation(len(picks))[:relational] if len(scene) >= 2 else []:
        i, j, rel = picks[p]
        a, b = scene[i], scene[j]
        if not unique(b):
            continue
        candidates = []
        if unique(a):
            truth = a.x < b.x if rel == "left" else a.x > b.x
            candidates.append(Question(f"is the {unique(a)} {rel} of the {unique(b)}", "yes" if truth else "no",
                                       "relative_position"))
        neighbour = j - 1 if rel == "left" else j + 1  # scenes are sorted left to right: the nearest one
        if 0 <= neighbour < len(scene):
            candidates.append(Question(f"what colour is the object {rel} of the {unique(b)}", scene[neighbour].colour,
                                       "neighbour_colour"))
        for q in candidates:
            if q.question not in asked:
                asked.add(q.question)
                qs.append(q)
    return qs


def direction_word(question: str) -> str:
    """The question's direction word ("left" or "right"), or "-" for questions without one."""
    words = question.split()
    return "left" if "left" in words else "right" if "right" in words else "-"


def mirror_question(question: str) -> str:
    """The same question about the horizontally mirrored image: left and right swap."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in question.split())


def _sample_scene(rng: np.random.Generator, size: int, max_objects: int,
                  forbidden: set[tuple[str, str, str]]) -> list[Shape]:
    scale = size / 64.0
    allowed = [o for o in all_objects() if o not in forbidden]
    n = int(rng.integers(1, max_objects + 1))
    scene: list[Shape] = []
    while len(scene) < n:
        s, c, sh = allowed[rng.integers(len(allowed))]
        r = rng.uniform(*SIZES[s]) * scale
        for _ in range(50):  # rejection-sample a free spot
            x, y = rng.uniform(r + 1, size - r - 1, size=2)
            # keep shapes apart, and far enough apart in x that "left of" is never a guess
            if all(np.hypot(x - o.x, y - o.y) > r + o.radius + 2 * scale and abs(x - o.x) > 3 * scale
                   for o in scene):
                scene.append(Shape(s, c, sh, float(x), float(y), float(r)))
                break
        else:
            break  # crowded: keep fewer objects
    return sorted(scene, key=lambda o: o.x)


def _draw(img: np.ndarray, o: Shape) -> None:
    h, w, _ = img.shape
    x0, x1 = max(int(o.x - o.radius) - 1, 0), min(int(o.x + o.radius) + 2, w)
    y0, y1 = max(int(o.y - o.radius) - 1, 0), min(int(o.y + o.radius) + 2, h)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dx, dy, r = xx + 0.5 - o.x, yy + 0.5 - o.y, o.radius
    if o.shape == "circle":
        mask = dx * dx + dy * dy <= r * r
    elif o.shape == "square":
        mask = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    elif o.shape == "triangle":  # apex up
        mask = (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.6)
    else:  # cross
        arm = 0.35 * r
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    img[y0:y1, x0:x1][mask] = COLOURS[o.colour]


def generate(split: str, num: int, seed: int = 0, image_size: int = 64, max_objects: int = 3,
             heldout: tuple[tuple[str, str, str], ...] = DEFAULT_HELDOUT,
             with_questions: bool = False, relational_questions: int = 1) -> ShapesSplit:
    """Render ``num`` scenes of one split. Deterministic in (split, num, seed, ...).
    ``relational_questions``: relational picks per scene (``questions_for``)."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {list(SPLIT_IDS)}, got {split!r}")
    unknown = [o for o in heldout if tuple(o) not in set(all_objects())]
    if unknown:
        raise ValueError(f"heldout combinations {unknown} are not (size, colour, shape) of this world")
    rng = np.random.default_rng([seed, SPLIT_IDS[split]])
    question_rng = np.random.default_rng([seed, SPLIT_IDS[split], 1])  # images never depend on it
    forbidden = {tuple(o) for o in heldout} if split == "train" else set()
    # noisy dark backgrounds, drawn in one call for speed
    images = rng.integers(20, 45, size=(num, image_size, image_size, 3), dtype=np.uint8)
    scenes, captions, questions = [], [], []
    for i in range(num):
        scene = _sample_scene(rng, image_size, max_objects, forbidden)
        for o in scene:
            _draw(images[i], o)
        scenes.append(scene)
        captions.append(caption_variants(scene))
        if with_questions:
            questions.append(questions_for(scene, question_rng, relational_questions))
    return ShapesSplit(images, scenes, captions, questions)
