"""Shapes-world videos: one object, one event, a caption that says what happens.

Every video shows one shape on a still, noisy background doing one thing over its frames:
moving left, right, up or down, growing, shrinking, changing colour, appearing or
disappearing. The caption names the object as it is at the start and the event:
"a small red circle moves to the left", "a large blue square shrinks", "a small green cross
turns yellow", "a large cyan triangle appears".

Every event has a time-reversed twin that is itself an event of this world (left <-> right,
up <-> down, grows <-> shrinks, turns X from Y <-> turns Y from X, appears <-> disappears),
with another caption: ``reverse`` gives it. A model that averages its frames sees the same
mean for a video and its reversal, so these pairs measure whether it reads time.

A video is a description (``VideoScene``), not pixels: ``frames(scene, indices, size)``
renders the frames asked for, so a loader samples first and draws only what it keeps.
Deterministic in (split, index, seed); splits use separate random streams.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mmlightning.data_modules import shapes_world as world
from mmlightning.registry import VOCABULARIES

MOTIONS = {"moves to the left": (-1, 0), "moves to the right": (1, 0), "moves up": (0, -1), "moves down": (0, 1)}
EVENTS = (*MOTIONS, "grows", "shrinks", "turns", "appears", "disappears")
REVERSED = {"moves to the left": "moves to the right", "moves to the right": "moves to the left",
            "moves up": "moves down", "moves down": "moves up", "grows": "shrinks", "shrinks": "grows",
            "turns": "turns", "appears": "disappears", "disappears": "appears"}
TRAVEL = 0.4  # of the frame: how far a moving object goes over the video


@VOCABULARIES.register("shapes_video")
def vocabulary() -> list[str]:
    """The shapes world's words and those of its videos' events."""
    return sorted(set(world.vocabulary()) | {"moves", "up", "down", "grows", "shrinks", "turns", "appears",
                                             "disappears"})


@dataclass(frozen=True)
class VideoScene:
    size: str  # at the start
    colour: str  # at the start
    shape: str
    event: str  # one of EVENTS
    x: float  # centre at the start, in [0, 1] of the frame
    y: float
    to_colour: str = ""  # "turns": the colour at the end
    at: float = 0.5  # "turns", "appears", "disappears": when, as a fraction of the video
    background: int = 0  # seed of the still background's noise
    num_frames: int = 12

    @property
    def caption(self) -> str:
        thing = f"a {self.size} {self.colour} {self.shape}"
        return f"{thing} turns {self.to_colour}" if self.event == "turns" else f"{thing} {self.event}"


def reverse(scene: VideoScene) -> VideoScene:
    """The same video played backwards, described as this world describes it."""
    end = state(scene, 1.0)
    return replace(scene, event=REVERSED[scene.event], size=end["size"], colour=end["colour"], x=end["x"], y=end["y"],
                   to_colour=scene.colour if scene.event == "turns" else "", at=1.0 - scene.at)


def state(scene: VideoScene, t: float) -> dict:
    """The object at time t in [0, 1]: size word, colour, centre (fractions), radius (fraction), visible."""
    lo, hi = (np.mean(world.SIZES[s]) / 64.0 for s in ("small", "large"))
    radius = lo if scene.size == "small" else hi
    size, colour, visible = scene.size, scene.colour, True
    x, y = scene.x, scene.y
    if scene.event in MOTIONS:
        dx, dy = MOTIONS[scene.event]
        x, y = x + dx * TRAVEL * t, y + dy * TRAVEL * t
    elif scene.event in ("grows", "shrinks"):
        start, end = (lo, hi) if scene.event == "grows" else (hi, lo)
        radius = start + (end - start) * t
        size = scene.size if t < 0.5 else ("large" if scene.event == "grows" else "small")
    elif scene.event == "turns" and t >= scene.at:
        colour = scene.to_colour
    elif scene.event == "appears":
        visible = t >= scene.at
    elif scene.event == "disappears":
        visible = t < scene.at
    return {"size": size, "colour": colour, "x": x, "y": y, "radius": radius, "visible": visible}


def frame_time(index: int, num_frames: int) -> float:
    """Frame i of n at time i / (n - 1): the first frame is t=0, the last t=1."""
    return index / max(num_frames - 1, 1)


def frames(scene: VideoScene, indices: list[int] | np.ndarray, size: int = 64) -> np.ndarray:
    """(len(indices), size, size, 3) uint8: the frames asked for, in the order asked."""
    background = np.random.default_rng(scene.background).integers(20, 45, size=(size, size, 3), dtype=np.uint8)
    out = np.repeat(background[None], len(indices), axis=0)
    for k, i in enumerate(indices):
        s = state(scene, frame_time(int(i), scene.num_frames))
        if s["visible"]:
            world._draw(out[k], world.Shape(s["size"], s["colour"], scene.shape, s["x"] * size, s["y"] * size,
                                            s["radius"] * size))
    return out


def sample_scene(rng: np.random.Generator, num_frames: int,
                 forbidden: set[tuple[str, str, str]] = frozenset()) -> VideoScene:
    """One video: an allowed object, an event drawn uniformly, a start that keeps it in frame."""
    allowed = [o for o in world.all_objects() if o not in forbidden]
    size, colour, shape = allowed[rng.integers(len(allowed))]
    event = EVENTS[rng.integers(len(EVENTS))]
    if event == "grows":
        size = "small"
    elif event == "shrinks":
        size = "large"
    margin = np.mean(world.SIZES["large"]) / 64.0 + 0.02
    dx, dy = MOTIONS.get(event, (0, 0))
    # the whole path stays inside [margin, 1 - margin]
    x_lo, x_hi = margin - min(dx, 0) * TRAVEL, 1 - margin - max(dx, 0) * TRAVEL
    y_lo, y_hi = margin - min(dy, 0) * TRAVEL, 1 - margin - max(dy, 0) * TRAVEL
    x, y = rng.uniform(x_lo, x_hi), rng.uniform(y_lo, y_hi)
    to_colour = ""
    if event == "turns":
        others = [c for c in world.COLOURS if c != colour]
        to_colour = others[rng.integers(len(others))]
    # a change lands between frames, never on the first or last one
    at = (int(rng.integers(1, num_frames - 1)) + 0.5) / (num_frames - 1)
    return VideoScene(size, colour, shape, event, float(x), float(y), to_colour, float(at),
                      int(rng.integers(2**31)), num_frames)


def generate(split: str, num: int, seed: int = 0, num_frames: int = 12,
             heldout: tuple[tuple[str, str, str], ...] = ()) -> list[VideoScene]:
    """``num`` videos of one split; objects in ``heldout`` never start a training video."""
    if split not in world.SPLIT_IDS:
        raise ValueError(f"split must be one of {list(world.SPLIT_IDS)}, got {split!r}")
    if num_frames < 4:
        raise ValueError(f"num_frames must be >= 4 for an event to happen between frames, got {num_frames}")
    rng = np.random.default_rng([seed, world.SPLIT_IDS[split], 7])
    forbidden = {tuple(o) for o in heldout} if split == "train" else set()
    return [sample_scene(rng, num_frames, forbidden) for _ in range(num)]
