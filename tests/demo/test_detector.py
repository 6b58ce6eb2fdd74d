"""The non-learned detector on the demo's own renders (exact, JPEG, blurred) and the
prompt-adherence scores on hand-made cases."""
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tatitok_fast.demo import detector, shapes


@pytest.fixture(scope="module")
def renders():
    return list(shapes.iter_samples(200, seed=11, pairs=shapes.ALL_PAIRS))


def _jpeg(im, quality=75):
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _blur(im):  # about what a tokenizer's blurry reconstruction does to edges
    return im.filter(ImageFilter.GaussianBlur(1.2))


@pytest.mark.parametrize("degrade", [None, _jpeg, _blur], ids=["exact", "jpeg75", "blur"])
def test_detector_is_right_on_ground_truth_renders(renders, degrade):
    images = [degrade(im) if degrade else im for im, _ in renders]
    s = detector.score(images, [t for _, t in renders])
    assert s["num_images"] == 200 and s["num_objects"] == sum(len(t["objects"]) for _, t in renders)
    assert s["color_acc"] >= 0.98 and s["shape_acc"] >= 0.98, s
    assert s["count_acc"] >= 0.98, s


def test_detections_give_position_and_box(renders):
    for im, truth in renders[:30]:
        dets = detector.detect(im)
        assert len(dets) == len(truth["objects"])
        for o in truth["objects"]:
            d = min(dets, key=lambda d: np.hypot(d["center"][0] - o["center"][0], d["center"][1] - o["center"][1]))
            assert (d["color"], d["shape"]) == (o["color"], o["shape"])
            assert np.abs(np.subtract(d["bbox"], o["bbox"])).max() <= 1
            if o["position"] != "center":
                assert d["position"] == o["position"]


def _two(left, right):
    return shapes.render([{"color": left[0], "shape": left[1], "bbox": [8, 20, 27, 39]},
                          {"color": right[0], "shape": right[1], "bbox": [38, 20, 57, 39]}])


def test_score_counts_colour_and_shape_per_prompt_object():
    image = _two(("red", "circle"), ("blue", "square"))
    # exactly right
    assert detector.score([image], ["a red circle on the left and a blue square on the right"])["object_acc"] == 1.0
    # sides swapped: neither colour nor shape is where the prompt puts it
    s = detector.score([image], ["a blue square on the left and a red circle on the right"])
    assert (s["color_acc"], s["shape_acc"], s["count_acc"]) == (0.0, 0.0, 1.0)
    # right colours, one wrong shape
    s = detector.score([image], ["a red triangle on the left and a blue square on the right"])
    assert (s["color_acc"], s["shape_acc"], s["object_acc"]) == (1.0, 0.5, 0.5)
    # one-object prompt: the largest object is matched, the extra object costs count accuracy
    big = shapes.render([{"color": "green", "shape": "triangle", "bbox": [4, 4, 35, 35]},
                         {"color": "yellow", "shape": "circle", "bbox": [44, 44, 55, 55]}])
    s = detector.score([big], [{"objects": [{"color": "green", "shape": "triangle", "position": "center"}]}])
    assert (s["color_acc"], s["shape_acc"], s["count_acc"]) == (1.0, 1.0, 0.0)
    # nothing drawn (white, or a dark background that is no shape): nothing found, every object wrong
    blank, dark = Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (150, 10, 10))
    s = detector.score([blank, dark], ["a red circle", "an orange square on the left and a red circle on the right"])
    assert (s["color_acc"], s["shape_acc"], s["count_acc"], s["num_objects"]) == (0.0, 0.0, 0.0, 3)


def test_score_accepts_tensors_and_arrays(renders):
    ims = [im for im, _ in renders[:8]]
    truths = [t for _, t in renders[:8]]
    want = detector.score(ims, truths)
    batch = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in ims])
    assert detector.score(batch, truths) == want
    assert detector.score([np.asarray(im) for im in ims], [t["caption"] for t in truths]) == want


def test_score_rejects_bad_inputs(renders):
    im, truth = renders[0]
    with pytest.raises(ValueError, match="truths: expected one per image"):
        detector.score([im, im], [truth])
    with pytest.raises(ValueError, match="is not 'a COLOR SHAPE'"):
        detector.score([im], ["a photo of a cat"])
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="images: expected"):
        detector.score("image.png", ["a red circle"])
