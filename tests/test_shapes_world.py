"""The embedded shapes world: deterministic, disjoint splits, held-out combinations, and
captions and answers that agree with what is drawn."""

from __future__ import annotations

import numpy as np

from mmlightning.data_modules import shapes_world as world


def test_deterministic_and_seeded() -> None:
    a = world.generate("train", 50, seed=1, with_questions=True)
    b = world.generate("train", 50, seed=1)
    c = world.generate("train", 50, seed=2)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions  # questions draw from their own stream
    assert not np.array_equal(a.images, c.images)


def test_splits_are_disjoint() -> None:
    train = world.generate("train", 3000)
    test = world.generate("test", 500)
    seen = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in seen for img in test.images)


def test_heldout_combinations_never_in_training() -> None:
    train = world.generate("train", 3000)
    test = world.generate("test", 1000)
    held = set(world.DEFAULT_HELDOUT)
    assert not any(o.combo in held for s in train.scenes for o in s)
    assert {o.combo for s in test.scenes for o in s} >= held


def test_captions_describe_the_scene_left_to_right() -> None:
    split = world.generate("val", 300, with_questions=True)
    vocab = set(world.vocabulary())
    for img, scene, captions, questions in zip(split.images, split.scenes, split.captions, split.questions):
        assert 1 <= len(scene) <= 3
        xs = [o.x for o in scene]
        assert xs == sorted(xs)
        assert captions[0] == " left of ".join(f"a {o.size} {o.colour} {o.shape}" for o in scene)
        for o in scene:  # the object's colour really is at its centre
            assert tuple(img[int(o.y), int(o.x)]) == world.COLOURS[o.colour]
        for q in questions:
            assert set(q.question.split()) | {q.answer} <= vocab
            if q.family == "count" and q.question.startswith("how many") and "objects" in q.question:
                colour = q.question.split()[2]
                assert q.answer == str(sum(o.colour == colour for o in scene))


def test_relation_answers_follow_positions() -> None:
    split = world.generate("train", 500, with_questions=True)
    checked = 0
    for scene, questions in zip(split.scenes, split.questions):
        for q in questions:
            words = q.question.split()
            if q.family == "relation" and words[0] == "is" and len(scene) == 2 and len({o.shape for o in scene}) == 2:
                a = next(o for o in scene if o.shape == words[2])
                b = next(o for o in scene if o.shape == words[-1])
                truth = a.x < b.x if words[3] == "left" else a.x > b.x
                assert q.answer == ("yes" if truth else "no")
                checked += 1
    assert checked > 20
