"""report.json / report.md / grid.png from given scores, and the tokenizer metrics."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tatitok_fast.demo import report, shapes


def _score(c, s):
    return {"color_acc": c, "shape_acc": s, "object_acc": min(c, s), "count_acc": 0.5, "num_images": 10,
            "num_objects": 14, "per_image": [{"objects": [], "detections": [], "matched": []}]}


RESULTS = {"seed": 3, "quick": True, "text_encoder": {"name": "tiny", "seed": 0}, "total_seconds": 75.5,
           "stages": {"data": 1.25, "train tokenizer": 61.0},
           "tokenizer": {"psnr": 23.456, "mean_image_psnr": 13.61, "codes_used": 48, "codebook_size": 64,
                         "num_images": 16,
                         "detector_on_reconstructions": {"color_acc": 1.0, "shape_acc": 0.8125, "count_acc": 0.9375}},
           "detector_on_data": {"color_acc": 1.0, "shape_acc": 0.995, "num_images": 200},
           "adherence": {"trained": {"seen": _score(0.9, 0.75), "held_out": _score(0.5, 0.625)},
                         "untrained": {"seen": _score(0.125, 0.25), "held_out": _score(0.0, 0.3)}}}


def test_write_report(tmp_path):
    json_path, md_path = report.write_report(tmp_path, RESULTS)
    data = json.loads(json_path.read_text())
    assert "per_image" not in data["adherence"]["trained"]["seen"]  # details stay out of the json
    want = {k: v for k, v in RESULTS["adherence"]["trained"]["seen"].items() if k != "per_image"}
    assert data["adherence"]["trained"]["seen"] == want and data["tokenizer"] == RESULTS["tokenizer"]
    md = md_path.read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| trained") or ln.startswith("| untrained")]
    assert rows == ["| trained | seen | 90.0% | 75.0% | 75.0% | 50.0% | 10 |",
                    "| trained | held-out | 50.0% | 62.5% | 50.0% | 50.0% | 10 |",
                    "| untrained (chance) | seen | 12.5% | 25.0% | 12.5% | 50.0% | 10 |",
                    "| untrained (chance) | held-out | 0.0% | 30.0% | 0.0% | 50.0% | 10 |"]
    assert "| 23.46 dB | 13.61 dB | 48 / 64 codes (75.0%) | 16 |" in md
    assert "Detector on these reconstructions: colour 100.0%, shape 81.2%, count 93.8%" in md
    assert "| train tokenizer | 1 min 1 s |" in md and "| data | 1.2 s |" in md
    assert "seed 3, quick mode, total 1 min 16 s" in md


def test_write_report_needs_adherence_and_writes_nothing_without(tmp_path):
    with pytest.raises(ValueError, match="results: expected an 'adherence' dict"):
        report.write_report(tmp_path, {k: v for k, v in RESULTS.items() if k != "adherence"})
    assert not list(tmp_path.iterdir())


def test_psnr_and_codebook_usage():
    x = torch.rand(3, 3, 8, 8)
    assert report.psnr(x, x) == 100.0
    y = (x + 0.1).clamp(0, 1)
    mse = ((x - y) ** 2).reshape(3, -1).mean(1)
    assert report.psnr(x, y) == pytest.approx(float((-10 * torch.log10(mse)).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        report.psnr(x, x[:2])
    u = report.codebook_usage(torch.tensor([[0, 1, 1, 3]]), 8)
    assert (u["codes_used"], u["usage"]) == (3, 3 / 8)
    p = np.array([0.25, 0.5, 0.25])
    assert u["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match=r"ids: expected values in \[0, 8\)"):
        report.codebook_usage([0, 8], 8)


def test_demo_grid_lays_out_prompt_rows_then_reconstruction_pairs():
    ims = [shapes.make_sample(0, i)[0] for i in range(6)]
    rows = [("a red circle", ims[:2]), ("a blue square on the left and a yellow triangle on the right [held-out]",
                                        ims[2:4])]
    grid = report.demo_grid(rows, [(ims[4], ims[5])] * 5, scale=2, label_width=200, pairs_per_row=4)
    a = np.asarray(grid)
    # 2 titles (30 px) + 2 prompt rows + 2 rows of pairs, each 128 + 4 px, + 4 px padding
    assert grid.size == (max(200 + 2 * 132, 4 * (256 + 12)) + 4, 2 * 30 + 4 * 132 + 4)
    first = np.asarray(ims[0].resize((128, 128), Image.NEAREST))
    inner = (slice(34 + 1, 34 + 127), slice(200 + 1, 200 + 127))  # inside its 1-px frame
    assert np.array_equal(a[inner], first[1:127, 1:127])  # first sample right of its label
    assert (a[34:34 + 128, :200] < 128).any()  # the label is drawn
    with pytest.raises(ValueError, match="nothing to draw"):
        report.demo_grid([], [])
