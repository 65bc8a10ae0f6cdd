"""Compositional digits: scene prompts and rendering, and the slot judge's verdicts on real
scenes against known answers (swapped positions, wrong colours, missing and extra digits)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distillkit.data.compose import (
    COLOURS,
    LAYOUTS,
    Scene,
    build_scenes,
    draw_scenes,
    render,
)
from distillkit.data.digits import DigitsSplit, load_digits_split
from distillkit.evaluation.compose_judge import compose_scores, read_scenes
from distillkit.evaluation.judge import DigitJudge


@pytest.fixture(scope="module")
def split() -> DigitsSplit:
    return load_digits_split(seed=0)


@pytest.fixture(scope="module")
def judge(digits_judge) -> DigitJudge:
    return digits_judge[0]


@pytest.fixture(scope="module")
def heldout(split: DigitsSplit) -> tuple[torch.Tensor, list[Scene]]:
    return build_scenes(split, 300, seed=1, heldout=True)


def test_prompts_name_slots_in_reading_order() -> None:
    pair = Scene("left", ((3, "red"), (7, "blue")))
    assert pair.prompt() == "a red three to the left of a blue seven"
    assert (
        dataclasses.replace(pair, template=1).prompt() == "a blue seven to the right of a red three"
    )
    assert (
        Scene("above", ((0, "green"), (5, "yellow"))).prompt() == "a green zero above a yellow five"
    )
    assert Scene("single", ((9, "yellow"),), template=1).prompt() == "a yellow nine, handwritten"


def test_scenes_are_seeded_balanced_and_pairs_differ() -> None:
    a, b = draw_scenes(60, seed=4), draw_scenes(60, seed=4)
    assert a == b and a != draw_scenes(60, seed=5)
    assert [s.layout for s in a[:6]] == [*LAYOUTS, *LAYOUTS]
    assert all(len({d for d, _ in s.slots}) == len(s.slots) for s in a)


def test_render_puts_each_colour_in_its_slot(split: DigitsSplit) -> None:
    scene = Scene("left", ((1, "red"), (2, "blue")))
    image = (render(scene, [split.train_images[0], split.train_images[1]]) + 1) / 2
    left, right = image[:, 16:48, :32], image[:, 16:48, 32:]
    for box, colour in ((left, "red"), (right, "blue")):
        ink = box.amax(0) > 0.5
        mean = box[:, ink].mean(1)
        expected = torch.tensor(COLOURS[colour])
        assert torch.allclose(mean / mean.max(), expected / expected.max(), atol=0.02)
    assert image[:, :16].max() == 0.0 and image[:, 48:].max() == 0.0  # nothing outside


def test_real_scenes_read_correct(judge: DigitJudge, split: DigitsSplit, heldout) -> None:
    images, scenes = heldout
    real, _ = build_scenes(split, 300, seed=2, heldout=True)
    scores = compose_scores(images, scenes, judge, real)
    assert scores["all_correct"] >= 0.95 and scores["colour"] == 1.0 and scores["count"] == 1.0
    assert scores["position"] >= 0.95 and scores["diversity"] > 0.7
    # a decoder's background haze (the sd15 scene VAE leaves ~0.035 mean ink) is not a digit
    hazy = (images + 0.12).clamp(-1.0, 1.0)  # +0.06 ink everywhere
    assert all(r["count"] for r in read_scenes(hazy, scenes, judge))


def test_wrong_answers_are_read_as_wrong(judge: DigitJudge, heldout) -> None:
    images, scenes = heldout
    pairs = [i for i, s in enumerate(scenes) if s.layout != "single"]
    swapped = [dataclasses.replace(scenes[i], slots=scenes[i].slots[::-1]) for i in pairs]
    rows = read_scenes(images[pairs], swapped, judge)
    assert sum(r["position"] for r in rows) == 0 and sum(r["all_correct"] for r in rows) == 0
    assert sum(r["binding"] for r in rows) >= 0.95 * len(rows)  # same pairs, other order

    names = list(COLOURS)  # each colour to the next: no scene keeps its colour multiset
    others = {c: names[(i + 1) % len(names)] for i, c in enumerate(names)}
    recoloured = [
        dataclasses.replace(s, slots=tuple((d, others[c]) for d, c in s.slots)) for s in scenes
    ]
    rows = read_scenes(images, recoloured, judge)
    assert sum(r["colour"] for r in rows) == 0 and sum(r["digit"] for r in rows) >= 0.95 * len(rows)

    blank = -torch.ones_like(images)
    assert not any(r["count"] for r in read_scenes(blank, scenes, judge))
    singles_drawn_as_pairs = [
        Scene("single", (s.slots[0],)) for i, s in enumerate(scenes) if i in pairs
    ]
    rows = read_scenes(images[pairs], singles_drawn_as_pairs, judge)
    assert not any(r["count"] for r in rows)  # the second digit is ink outside the prompted slot


def test_compose_training_data_is_training_scans_with_their_prompts(judge: DigitJudge) -> None:
    """``data.prompts: digits-compose`` (the compose students' data): a fixed set of scenes
    from the training scans, each image read correct against its own prompt by the slot judge
    and not against a neighbour's; ``data.images: digits-compose`` loads the same set."""
    from distillkit.config import DataConfig
    from distillkit.data.compose import SCENE_SIZE
    from distillkit.data.sources import COMPOSE_TRAIN_SCENES, load_train_data

    data = load_train_data(DataConfig(prompts="digits-compose"), SCENE_SIZE, False, False)
    assert len(data.prompts) == COMPOSE_TRAIN_SCENES and data.captions == data.prompts
    assert data.images.shape == (COMPOSE_TRAIN_SCENES, 3, SCENE_SIZE, SCENE_SIZE)
    again = load_train_data(DataConfig(images="digits-compose"), SCENE_SIZE, False, True)
    assert again.prompts == data.prompts and torch.equal(again.images, data.images)
    scenes = draw_scenes(COMPOSE_TRAIN_SCENES, seed=100)[:60]
    assert [s.prompt() for s in scenes] == data.prompts[:60]
    rows = read_scenes(data.images[:60], scenes, judge)
    assert sum(r["all_correct"] for r in rows) / 60 >= 0.9
    shifted = read_scenes(data.images[:60], scenes[1:] + scenes[:1], judge)
    assert sum(r["all_correct"] for r in shifted) / 60 <= 0.2
