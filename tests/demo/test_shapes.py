"""Procedural shapes: captions, renders, the held-out split and the webdataset writer."""
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from tatitok_fast.demo import shapes


def test_held_out_split_keeps_every_colour_and_shape_in_training():
    assert len(shapes.ALL_PAIRS) == 18 and len(shapes.HELD_OUT_PAIRS) == 4
    assert set(shapes.TRAIN_PAIRS) | set(shapes.HELD_OUT_PAIRS) == set(shapes.ALL_PAIRS)
    assert not set(shapes.TRAIN_PAIRS) & set(shapes.HELD_OUT_PAIRS)
    assert {c for c, _ in shapes.TRAIN_PAIRS} == set(shapes.COLORS)
    assert {s for _, s in shapes.TRAIN_PAIRS} == set(shapes.SHAPES)


def test_captions_parse_back_to_their_objects():
    for c, s in shapes.ALL_PAIRS:
        objs = [{"color": c, "shape": s, "position": "center"}]
        text = shapes.caption(objs)
        assert text == ("an" if c == "orange" else "a") + f" {c} {s}"
        assert shapes.parse_caption(text) == objs
    two = [{"color": "yellow", "shape": "triangle", "position": "right"},
           {"color": "blue", "shape": "square", "position": "left"}]
    text = shapes.caption(two)
    assert text == "a blue square on the left and a yellow triangle on the right"
    assert shapes.parse_caption(text) == two[::-1]
    with pytest.raises(ValueError, match="is not 'a COLOR SHAPE'"):
        shapes.parse_caption("a pink hexagon")
    with pytest.raises(ValueError, match="left and the right"):
        shapes.caption([{"color": "red", "shape": "circle", "position": "left"}] * 2)


def test_renders_are_flat_palette_colours_inside_their_boxes():
    palette = {tuple(v) for v in shapes.COLORS.values()} | {shapes.BACKGROUND}
    for i in range(40):
        im, truth = shapes.make_sample(5, i)
        a = np.asarray(im)
        assert a.shape == (64, 64, 3)
        assert {tuple(p) for p in a.reshape(-1, 3)} <= palette  # no anti-aliased blends
        inside = np.zeros((64, 64), bool)
        for o in truth["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 < 64 and 0 <= y0 < y1 < 64 and x1 - x0 + 1 == o["size"]
            box = a[y0:y1 + 1, x0:x1 + 1]
            assert (box == shapes.COLORS[o["color"]]).all(-1).any()
            inside[y0:y1 + 1, x0:x1 + 1] = True
            if o["position"] != "center":
                assert (x1 < 32) == (o["position"] == "left") and (x0 >= 32) == (o["position"] == "right")
        assert (a[~inside] == 255).all()  # nothing drawn outside the boxes
        assert shapes.parse_caption(truth["caption"]) == [
            {k: o[k] for k in ("color", "shape", "position")} for o in truth["objects"]]


def test_test_prompts():
    seen, held = shapes.test_prompts("seen"), shapes.test_prompts("held_out")
    assert seen == shapes.test_prompts("seen")  # deterministic
    pairs = lambda p: {(o["color"], o["shape"]) for o in p["objects"]}  # noqa: E731
    assert all(pairs(p) <= set(shapes.TRAIN_PAIRS) for p in seen)
    assert all(pairs(p) & set(shapes.HELD_OUT_PAIRS) for p in held)
    assert {(o["color"], o["shape"]) for p in held for o in p["objects"]} >= set(shapes.HELD_OUT_PAIRS)
    for p in seen + held:
        assert shapes.parse_caption(p["caption"]) == p["objects"]
    with pytest.raises(ValueError, match="split: expected 'seen' or 'held_out'"):
        shapes.test_prompts("train")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.tar"))}


def test_writer_is_deterministic_and_reads_back_with_webdataset(tmp_path):
    import webdataset as wds

    a = shapes.write_shards(tmp_path / "a", 25, seed=3, shard_size=10)
    shapes.write_shards(tmp_path / "b", 25, seed=3, shard_size=10)
    shapes.write_shards(tmp_path / "c", 25, seed=4, shard_size=10)
    assert [p.name for p in a] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")

    samples = list(wds.WebDataset([str(p) for p in a], shardshuffle=False, empty_check=False))
    assert len(samples) == 25
    for i, s in enumerate(samples):
        truth = json.loads(s["json"])
        assert s["txt"].decode() == truth["caption"] and truth["aes_score"] == shapes.AES_SCORE
        im = Image.open(io.BytesIO(s["png"]))
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(shapes.render(truth["objects"])))
        want_im, want_truth = shapes.make_sample(3, i)  # sample i depends on (seed, i) only
        assert truth == json.loads(json.dumps(want_truth))


def test_training_shards_never_hold_held_out_pairs(tmp_path):
    import webdataset as wds

    paths = shapes.write_shards(tmp_path, 400, seed=0, shard_size=400)
    seen = set()
    for s in wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False):
        seen |= {(o["color"], o["shape"]) for o in json.loads(s["json"])["objects"]}
    assert seen == set(shapes.TRAIN_PAIRS)  # every training pair shows up, no held-out one


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num: expected an int >= 1"):
        shapes.write_shards(tmp_path, 0)
    with pytest.raises(ValueError, match="image_format: expected 'png' or 'jpg'"):
        shapes.write_shards(tmp_path, 2, image_format="gif")
    with pytest.raises(ValueError, match="pairs: expected"):
        shapes.write_shards(tmp_path, 2, pairs=[("pink", "circle")])
    assert not list(tmp_path.iterdir())
