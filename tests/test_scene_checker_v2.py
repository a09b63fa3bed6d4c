"""The second scene checker (tools/scene_checker_v2.py): it reads the renderer's own v2 images
perfectly, attribute by attribute and kind by kind, and scores altered images as wrong."""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

import demo_scenes_v2 as v2  # noqa: E402
from scene_checker_v2 import ATTRIBUTES, detect_all, score, summarize  # noqa: E402


def test_reads_every_attribute_of_rendered_scenes():
    images, scenes = v2.sample_scenes(21, 1000)
    held_images, held = v2.heldout_samples(200, seed=3)
    images, scenes = np.concatenate([images, held_images]), scenes + held
    checks = [score(detect_all(im), sc) for im, sc in zip(images, scenes)]
    summary = summarize(checks, scenes)
    for kind in ("single", "relation", "count"):
        assert summary[kind]["n"] >= 300, kind
    wrong = {(sc.kind, key) for c, sc in zip(checks, scenes) for key in ("correct", "correct_strict") + ATTRIBUTES
             if c[key] is False}
    assert not wrong  # 100 %, not "almost": a miss is a checker bug
    assert summary["single"]["relation"] is None and summary["relation"]["position"] is None
    assert summary["all"]["size"] == 1.0 and summary["count"]["correct"] == 1.0


def _scene(kind: str, **where) -> v2.Scene:
    """The first training scene of `kind` (and, given, relation) from a fixed stream."""
    for i in range(500):
        _, sc = v2.scene(99, i)
        if sc.kind == kind and all(getattr(sc, k) == v for k, v in where.items()) and len(sc.objects) >= (
                3 if kind == "count" else 1):
            return sc
    raise AssertionError(f"no {kind} scene in the stream")


def _checks(drawn: v2.Scene, asked: v2.Scene) -> dict:
    """Render `drawn`, score it against what `asked` asked for."""
    return score(detect_all(v2.render(drawn, random.Random(5))), asked)


def _moved(obj: v2.Obj, row: int, col: int) -> v2.Obj:
    return replace(obj, row=row, col=col)


def test_swapped_relation_is_wrong():
    sc = _scene("relation", relation="left of")
    a, b = sc.objects
    swapped = replace(sc, objects=(_moved(a, b.row, b.col), _moved(b, a.row, a.col)))
    right, wrong = _checks(sc, sc), _checks(swapped, sc)
    assert right["relation"] and right["correct"]
    assert wrong["colour"] and wrong["count"] and not wrong["relation"] and not wrong["correct"]


def test_relation_with_a_missing_colour_is_wrong():
    sc = _scene("relation")
    a, b = sc.objects
    other = next(c for c in v2.COLOUR_NAMES if c not in (a.colour, b.colour))
    checks = _checks(replace(sc, objects=(a, replace(b, colour=other))), sc)
    assert not checks["colour"] and not checks["relation"] and not checks["correct"] and not checks["shape"]


def test_missing_and_extra_objects_in_a_count_are_wrong():
    sc = _scene("count")
    assert len(sc.objects) == 3
    missing = _checks(replace(sc, objects=sc.objects[:2]), sc)
    assert not missing["count"] and not missing["colour"] and not missing["correct"]
    asked_two = replace(sc, objects=sc.objects[:2])
    extra = _checks(sc, asked_two)
    assert not extra["count"] and not extra["correct"]


def test_count_ignores_other_colours_but_the_count_attribute_does_not():
    sc = _scene("count")
    other = next(c for c in v2.COLOUR_NAMES if c != sc.objects[0].colour)
    checks = _checks(replace(sc, objects=sc.objects[:2] + (replace(sc.objects[2], colour=other),)),
                     replace(sc, objects=sc.objects[:2]))
    assert checks["correct"] and not checks["count"] and not checks["colour"]


def test_single_wrong_colour_position_shape_and_size():
    sc = _scene("single", names_size=True)
    obj = sc.objects[0]
    colour = next(c for c in v2.COLOUR_NAMES if c != obj.colour)
    cell = next(rc for rc in sorted(v2.POSITIONS) if rc != (obj.row, obj.col))
    shape = next(s for s in v2.SHAPES if s != obj.shape)
    size = next(s for s in v2.SIZE_NAMES if s != obj.size)
    assert _checks(sc, sc)["correct_strict"] and _checks(sc, sc)["size"]
    wrong_colour = _checks(replace(sc, objects=(replace(obj, colour=colour),)), sc)
    assert not wrong_colour["colour"] and not wrong_colour["correct"] and wrong_colour["count"]
    wrong_cell = _checks(replace(sc, objects=(_moved(obj, *cell),)), sc)
    assert wrong_cell["colour"] and not wrong_cell["position"] and not wrong_cell["correct"]
    wrong_shape = _checks(replace(sc, objects=(replace(obj, shape=shape),)), sc)
    assert wrong_shape["correct"] and not wrong_shape["shape"] and not wrong_shape["correct_strict"]
    wrong_size = _checks(replace(sc, objects=(replace(obj, size=size),)), sc)
    assert wrong_size["correct"] and not wrong_size["size"]


def test_an_extra_object_fails_a_single_but_not_a_relation():
    single, relation = _scene("single"), _scene("relation")
    extra = next(o for o in relation.objects if (o.row, o.col) != (single.objects[0].row, single.objects[0].col)
                 and o.colour != single.objects[0].colour)
    checks = _checks(replace(single, objects=single.objects + (extra,)), single)
    assert checks["position"] and not checks["colour"] and not checks["count"] and not checks["correct"]
    a, b = relation.objects
    cell = next(rc for rc in sorted(v2.POSITIONS) if rc not in ((a.row, a.col), (b.row, b.col)))
    third = next(c for c in v2.COLOUR_NAMES if c not in (a.colour, b.colour))
    stranger = replace(a, colour=third, row=cell[0], col=cell[1])
    checks = _checks(replace(relation, objects=relation.objects + (stranger,)), relation)
    assert checks["correct"] and not checks["count"] and not checks["colour"]


@pytest.mark.parametrize("kind", ["single", "relation", "count"])
def test_a_blank_image_is_wrong_in_everything(kind):
    sc = _scene(kind)
    checks = score(detect_all(np.full((128, 128, 3), 238, dtype=np.uint8)), sc)
    assert not any(v for v in checks.values() if v is not None)


def test_specks_are_not_objects():
    image = np.full((128, 128, 3), 238, dtype=np.uint8)
    image[10:15, 60:65] = v2.COLOURS["red"]  # 25 pixels: below MIN_PIXELS
    image[60:70, 60:70] = v2.COLOURS["blue"]  # 100 pixels: an object
    found = detect_all(image.astype(np.float32) / 255)  # float images in [0, 1] read the same
    assert [(f.colour, f.shape, f.row, f.col) for f in found] == [("blue", "square", 1, 1)]
