"""curves.png: the demo's learning curves read from metrics.jsonl."""
import json

import numpy as np
import pytest
from PIL import Image

from tatitok_fast.demo import curves


def test_read_series_keeps_rows_with_the_key_in_order(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "loss": 0.5}, {"step": 10, "eval/psnr": 14.0}, {"step": 20, "loss": 0.3},
            {"step": 20, "eval/psnr": float("nan")}, {"step": 30, "eval/psnr": 21.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curves.read_series(log, "eval/psnr") == [(10.0, 14.0), (30.0, 21.5)]  # NaN rows dropped
    assert curves.read_series(log, "loss") == [(10.0, 0.5), (20.0, 0.3)]
    assert curves.read_series(log, "missing") == []


def test_plot_curves_draws_one_panel_per_series(tmp_path):
    rising = curves.Panel("psnr", [(0, 13.0), (50, 18.0), (100, 22.0)], reference=13.6, reference_label="mean")
    empty = curves.Panel("accuracy", [])
    path = curves.plot_curves([rising, empty], tmp_path / "curves.png", panel_size=(300, 200))
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape == (200, 600, 3)
    line = (np.abs(im.astype(int) - (30, 80, 200)).sum(-1) < 30)  # the series' colour
    assert line[:, :300].sum() > 50 and line[:, 300:].sum() == 0  # drawn in the first panel only
    rows = np.nonzero(line[:, :300])[0]
    cols = np.nonzero(line[:, :300])[1]
    assert rows[cols.argmax()] < rows[cols.argmin()]  # rising: the right end sits higher (smaller row)
    with pytest.raises(ValueError, match="panels: expected at least one panel"):
        curves.plot_curves([], tmp_path / "none.png")
