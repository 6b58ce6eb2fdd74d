"""The ADM-style sample-batch metrics (evaluation/fid.py, npz.py) on hand-checked cases:
Fréchet distances of 1-D / 2-D feature sets with closed forms, precision/recall of a 1-D set
worked out by hand, the Inception Score split rule, precomputed reference statistics used
as given, and the streamed .npz format."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.evaluation.fid import (evaluate_sample_batch, fid_from_features, manifold_radii, npz_features,
                                         precision_recall)
from tatitok_fast.evaluation.npz import NpzArray, write_npz_stream


def test_frechet_distance_of_1d_features_has_the_closed_form():
    # a: mean 0, unbiased var 2; b: mean 4, var 8 -> (0-4)^2 + (sqrt2 - sqrt8)^2 = 16 + 2 = 18
    assert fid_from_features([-1.0, 1.0], [2.0, 6.0]) == pytest.approx(18.0, abs=1e-9)


def test_frechet_distance_of_2d_features_has_the_closed_form():
    a = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], float)  # mean 0, covariance (2/3) I
    b = 3 * a + [1, 2]  # mean (1, 2), covariance 6 I
    # |mu|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) = 5 + 2 (2/3 + 6 - 2 * 2) = 31/3
    assert fid_from_features(a, b) == pytest.approx(31 / 3, abs=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_precision_recall_of_a_hand_checked_1d_case():
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0], [-100.0]])
    smp = torch.tensor([[1.5], [5.0], [20.0], [30.0], [40.0]])
    # squared distance to the 3rd neighbour (the point itself is the 0th)
    assert manifold_radii(ref).tolist() == [9.0, 4.0, 4.0, 9.0, 81.0, 10404.0]
    assert manifold_radii(smp).tolist() == [812.25, 625.0, 342.25, 625.0, 1225.0]
    # precision: 1.5 (0.25 from 1 <= 4) and 5 (4 from 3 <= 9) lie in reference balls; 20, 30, 40 do not.
    # recall: every reference point lies in 1.5's ball (<= 812.25) except -100 (101.5^2 > 812.25, and
    # 105^2 > 625 from 5)
    precision, recall = precision_recall(ref, smp, block=4)  # blocks smaller than the sets
    assert precision == pytest.approx(2 / 5) and recall == pytest.approx(5 / 6)
    assert precision_recall(ref, ref) == (1.0, 1.0)


class TinyFeatures(nn.Module):
    """A small feature network in InceptionFeatures' with_spatial form: uint8 images ->
    pool (channel means and stds, 6), logits (+-60 by brightness, 2 classes), spatial (4)."""

    device = torch.device("cpu")

    def with_spatial(self, images: torch.Tensor):
        x = images.float() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        bright = (x.mean((1, 2, 3)) > 0.5).float()
        return pool, 60 * torch.stack([bright, 1 - bright], 1), F.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_inception_score_is_the_mean_over_splits(tmp_path):
    white, black = np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)
    np.savez(tmp_path / "x.npz", arr_0=np.stack([white, black, white, white]))
    # split 1 (white, black): two confident classes -> 2; split 2 (white, white): one -> 1
    feats = npz_features(str(tmp_path / "x.npz"), TinyFeatures(), batch_size=3, split_size=2)
    assert feats.inception_score == pytest.approx(1.5, abs=1e-6)
    assert feats.count == 4 and feats.features.shape == (4, 6)


def test_identical_sets_score_zero(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(12))
    out = evaluate_sample_batch(str(tmp_path / "s.npz"), str(tmp_path / "s.npz"), TinyFeatures(), batch_size=5)
    assert abs(out["fid"]) < 1e-6 and abs(out["sfid"]) < 1e-6
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert out["num_samples"] == out["num_reference"] == 12 and out["reference_statistics"] == "computed"
    other = _images(12, seed=1) // 2  # darker: the means move
    np.savez(tmp_path / "t.npz", arr_0=other)
    assert evaluate_sample_batch(str(tmp_path / "t.npz"), str(tmp_path / "s.npz"), TinyFeatures())["fid"] > 0.01


def test_precomputed_reference_statistics_are_used_as_given(tmp_path):
    images = _images(10)
    np.savez(tmp_path / "s.npz", arr_0=images)
    own = npz_features(str(tmp_path / "s.npz"), TinyFeatures())
    (mu, sigma), (mu_s, sigma_s) = own.pool.mean_cov(), own.spatial.mean_cov()
    d, d_s = np.arange(6) * 0.1, np.full(4, 0.5)
    stats = dict(mu=mu + d, sigma=sigma, mu_s=mu_s + d_s, sigma_s=sigma_s)
    np.savez(tmp_path / "stats_only.npz", **stats)
    out = evaluate_sample_batch(str(tmp_path / "s.npz"), str(tmp_path / "stats_only.npz"), TinyFeatures())
    # same covariance, means shifted by d: the Fréchet distance is |d|^2
    assert out["fid"] == pytest.approx(float(d @ d), abs=1e-6)
    assert out["sfid"] == pytest.approx(float(d_s @ d_s), abs=1e-6)
    assert out["precision"] is None and out["recall"] is None and out["reference_statistics"] == "precomputed"
    assert any("precision/recall skipped" in n for n in out["notes"])
    np.savez(tmp_path / "both.npz", arr_0=images, **stats)  # ADM's reference batches hold both
    both = evaluate_sample_batch(str(tmp_path / "s.npz"), str(tmp_path / "both.npz"), TinyFeatures())
    assert both["fid"] == pytest.approx(float(d @ d), abs=1e-6)
    assert both["precision"] == 1.0 and both["recall"] == 1.0


def test_streamed_npz_is_what_numpy_writes(tmp_path):
    images = _images(7)
    write_npz_stream(tmp_path / "a.npz", {"arr_0": (images.shape, np.uint8, [images[:3], images[3:]]),
                                          "arr_1": ((7,), np.int64, [np.arange(7)])})
    with np.load(tmp_path / "a.npz") as f:
        assert f.files == ["arr_0", "arr_1"]
        np.testing.assert_array_equal(f["arr_0"], images)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    with NpzArray(tmp_path / "c.npz") as arr:
        assert arr.shape == images.shape
        np.testing.assert_array_equal(np.concatenate(list(arr.batches(2))), images)
    with pytest.raises(ValueError, match="5 rows written, 7 declared"):
        write_npz_stream(tmp_path / "b.npz", {"arr_0": (images.shape, np.uint8, [images[:5]])})
    assert not (tmp_path / "b.npz").exists(), "nothing is left behind by a failed write"
    data = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="cut.npz"):
        with NpzArray(tmp_path / "cut.npz") as arr:
            list(arr.batches(2))


def test_eval_fid_cli_end_to_end_with_the_inception_network(tmp_path, capsys):
    """torch-fidelity's InceptionV3 (random weights: the numbers mean nothing but identical sets)."""
    from tatitok_fast.cli import main

    np.savez(tmp_path / "s.npz", arr_0=_images(6))
    rc = main(["eval", "fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"),
               "--inception-weights", "random", "--device", "cpu", "--no-progress", "-o", str(tmp_path / "m.json")])
    assert rc == 0
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert abs(metrics["fid"]) < 1e-3 and metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert math.isfinite(metrics["inception_score"]) and metrics["num_samples"] == 6
    assert "FID:" in capsys.readouterr().out
