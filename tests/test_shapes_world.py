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


def test_relative_position_answers_follow_positions() -> None:
    split = world.generate("train", 500, with_questions=True)
    checked = 0
    for scene, questions in zip(split.scenes, split.questions):
        for q in questions:
            words = q.question.split()
            two_shapes = len(scene) == 2 and len({o.shape for o in scene}) == 2
            if q.family == "relative_position" and two_shapes:
                a = next(o for o in scene if o.shape == words[2])
                b = next(o for o in scene if o.shape == words[-1])
                truth = a.x < b.x if words[3] == "left" else a.x > b.x
                assert q.answer == ("yes" if truth else "no")
                checked += 1
    assert checked > 20


def test_relational_questions_per_scene_and_neighbour_answers() -> None:
    one = world.generate("train", 300, with_questions=True)
    three = world.generate("train", 300, with_questions=True, relational_questions=3)
    assert one.images.tobytes() == three.images.tobytes()  # questions never change the images
    count = lambda split: sum(q.family in world.RELATIONAL_FAMILIES for qs in split.questions for q in qs)  # noqa: E731
    assert count(three) > 2 * count(one)
    checked = 0
    for scene, questions in zip(three.scenes, three.questions):
        assert len({q.question for q in questions}) == len(questions)  # no question twice about one image
        for q in questions:
            if q.family == "neighbour_colour" and len({o.shape for o in scene}) == len(scene):
                words = q.question.split()  # what colour is the object left of the <shape>
                k = next(i for i, o in enumerate(scene) if o.shape == words[-1])
                neighbour = k - 1 if words[5] == "left" else k + 1
                assert 0 <= neighbour < len(scene)
                assert q.answer == scene[neighbour].colour
                checked += 1
    assert checked > 50


def answer_from_positions(question: str, scene: list[world.Shape]) -> str:
    """The answer to a relational question about a scene whose objects all differ in shape
    (so each is named by its shape), worked out from the objects' x alone."""
    words = question.split()
    by_shape = {o.shape: o for o in scene}
    b = by_shape[words[-1]]
    if words[0] == "is":  # is the <shape> left/right of the <shape>
        a = by_shape[words[2]]
        return "yes" if (a.x < b.x if words[3] == "left" else a.x > b.x) else "no"
    side = [o for o in scene if (o.x < b.x if words[5] == "left" else o.x > b.x)]  # what colour is the object ...
    return min(side, key=lambda o: abs(o.x - b.x)).colour


def test_mirrored_question_about_the_mirrored_scene_has_the_same_answer() -> None:
    """What data.mirror_right relies on: mirror the scene (x -> size - x) and the question
    (left <-> right), and the answer, worked out again from positions, does not change."""
    split = world.generate("train", 400, with_questions=True, relational_questions=4)
    checked = 0
    for scene, questions in zip(split.scenes, split.questions):
        if len({o.shape for o in scene}) != len(scene):
            continue
        mirrored = [world.Shape(o.size, o.colour, o.shape, 64 - o.x, o.y, o.radius) for o in scene]
        for q in questions:
            if q.family in world.RELATIONAL_FAMILIES:
                assert answer_from_positions(q.question, scene) == q.answer
                assert answer_from_positions(world.mirror_question(q.question), mirrored) == q.answer
                checked += 1
    assert checked > 200


def test_mirror_question_swaps_directions_only() -> None:
    assert world.mirror_question("is the red circle left of the square") == "is the red circle right of the square"
    assert world.mirror_question("what colour is the object right of the cross") == \
        "what colour is the object left of the cross"
    assert world.mirror_question("how many circles are there") == "how many circles are there"
