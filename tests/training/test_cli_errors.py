"""User errors of a training launch, run as a user runs them (a subprocess of `tatitok-fast
train` or `python -m tatitok_fast.training.train`): exit status 2, `error: ...` as the first
line of stderr, no traceback, and nothing written into the run folder (the data is checked
before any model is built). TATITOK_FAST_DEBUG=1 brings the traceback back."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.shards import write_token_shards

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "training" / "recipes" / "maskgen_vq_tiny.toml"
ENTRY = {"cli": [sys.executable, "-m", "tatitok_fast.cli", "train"],
         "module": [sys.executable, "-m", "tatitok_fast.training.train"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_shards")
    return {"vq": write_token_shards(root / "vq", "vq", shards=1, per_shard=8),
            "other_codebook": write_token_shards(root / "cb", "vq", shards=1, per_shard=8, codebook_size=128),
            "images": [write_image_shard(root / "images-000000.tar")]}


def write_image_shard(path: Path) -> str:
    """Image + caption samples: what a tokenizer recipe reads, not a generator recipe."""
    import webdataset as wds
    from PIL import Image

    with wds.TarWriter(str(path)) as sink:
        for i in range(4):
            buf = io.BytesIO()
            Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(buf, format="PNG")
            sink.write({"__key__": f"img{i:04d}", "png": buf.getvalue(), "txt": "a grey square"})
    return str(path)


def launch(entry: str, run: Path, shards: str, *extra: str, env: dict | None = None):
    cmd = [*ENTRY[entry], "--config", str(RECIPE), "--data.shards", shards, "--job.dump_folder", str(run),
           "--data.num_workers", "0", "--training.steps", "2", "--metrics.progress", "false", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_user_error(proc, run: Path, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    first = proc.stderr.splitlines()[0]
    for fragment in fragments:
        assert fragment in first, first
    assert not run.exists(), sorted(run.rglob("*"))  # nothing was written


def test_missing_shard_file(shards, tmp_path):
    missing = str(Path(shards["vq"][0]).with_name("tokens-000099.tar"))
    proc = launch("cli", tmp_path / "run", f"{shards['vq'][0]},{missing}")
    assert_user_error(proc, tmp_path / "run", "data.shards", "1 of 2 shard files do not exist", "tokens-000099.tar")


@pytest.mark.slow  # 15 s; the other launch errors run in CI
def test_pattern_matching_no_file(shards, tmp_path):
    folder = Path(shards["vq"][0]).parent
    proc = launch("module", tmp_path / "run", str(folder / "nothing-*.tar"))
    assert_user_error(proc, tmp_path / "run", "data.shards", "matches no file")
    proc = launch("cli", tmp_path / "run", str(folder / "tokens-{000010..000012}.tar"))  # a brace range of absent files
    assert_user_error(proc, tmp_path / "run", "3 of 3 shard files do not exist")


@pytest.mark.slow  # 7 s; the token-shard checks run in CI (another codebook)
def test_wrong_shard_kind(shards, tmp_path):
    proc = launch("cli", tmp_path / "run", shards["images"][0])
    assert_user_error(proc, tmp_path / "run", "recipe 'maskgen'", "no tokens")


def test_token_shard_of_another_codebook(shards, tmp_path):
    proc = launch("module", tmp_path / "run", shards["other_codebook"][0])
    assert_user_error(proc, tmp_path / "run", "codebook_size=128", "expects codebook_size=64")


def test_bad_config_key(shards, tmp_path):
    proc = launch("cli", tmp_path / "run", shards["vq"][0], "--training.stepz", "3")
    assert_user_error(proc, tmp_path / "run", "--training.stepz: unknown key")


@pytest.mark.slow  # --debug's traceback; the errors themselves run in CI
def test_debug_shows_the_traceback(shards, tmp_path):
    proc = launch("cli", tmp_path / "run", shards["images"][0], env={"TATITOK_FAST_DEBUG": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "DataError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("error: data.shards")
