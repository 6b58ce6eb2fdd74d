"""`tatitok-fast make-shards` on small class folders, run as a user runs it (a subprocess):
every image lands in exactly one sample with the label of its folder (sorted order, the
mapping in classes.json), JPEG bytes copied unchanged; killed half-way (SIGKILL) and rerun:
finished shards are kept untouched, the rest is written, and every image is there exactly once;
--workers and --part-index/--num-parts write the same shards as one process; bad input is an
`error:` line with exit 2."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tatitok_fast.training.data import read_shard

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["n01440764", "n01443537", "n02102040"]


def make_class_folder(root: Path, per_class: int, size: int = 32, seed: int = 0) -> dict[str, int]:
    """ImageNet-style train/<wnid>/*.JPEG (and some .png) of random pixels -> {relative path: class}."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, name in reversed(list(enumerate(CLASSES))):  # created out of order: the index is the sorted order
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            ext = ".JPEG" if i % 3 else ".png"
            img.save(root / name / f"{name}_{i}{ext}", format="JPEG" if ext == ".JPEG" else "PNG")
            out[f"{name}/{name}_{i}{ext}"] = c
    (root / CLASSES[0] / f"{CLASSES[0]}_1.txt").write_text("a tench")
    return out


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tatitok_fast.cli", "make-shards", *args, "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def read_all(out: Path) -> list[dict]:
    return [s for p in sorted(out.glob("shard-*.tar")) for s in read_shard(str(p))]


def check_every_image_once(src: Path, out: Path, truth: dict[str, int]) -> None:
    samples = read_all(out)
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert sorted(sources) == sorted(truth), "every image exactly once"
    assert len({s["__key__"] for s in samples}) == len(samples)
    assert json.loads((out / "classes.json").read_text()) == {n: i for i, n in enumerate(CLASSES)}
    for s, rel in zip(samples, sources):
        assert int(s["cls"]) == truth[rel], rel
        if rel.endswith(".JPEG"):
            assert s["jpg"] == (src / rel).read_bytes(), rel  # copied, not re-encoded
        else:
            assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"
        assert ("txt" in s) == rel.endswith(f"{CLASSES[0]}_1.JPEG")


def test_class_folder_to_labelled_shards(tmp_path):
    src, out = tmp_path / "train", tmp_path / "shards"
    truth = make_class_folder(src, per_class=4)
    proc = run(str(src), "-o", str(out), "--shard-size", "5")
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("shard-*.tar"))) == 3  # 12 images / 5
    check_every_image_once(src, out, truth)
    assert [s["txt"] for s in read_all(out) if "txt" in s] == [b"a tench"]


def test_tokenizer_recipe_reads_the_shards(tmp_path):
    """The engine's up-front data check passes on make-shards output for a tokenizer recipe, and
    its decode_sample gives the official train transform of the stored JPEG (the .cls beside it
    is ignored)."""
    import torch

    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.data import decode_image
    from tatitok_fast.training.recipes.tatitok import random_resized_crop
    from tatitok_fast.training.spec import recipe_class
    from tatitok_fast.training.train import check_data

    src, out = tmp_path / "train", tmp_path / "shards"
    make_class_folder(src, per_class=2, size=48)
    assert run(str(src), "-o", str(out)).returncode == 0
    cfg = load_config(ROOT / "training" / "recipes" / "tatitok_vq_tiny.toml",
                      ["--data.shards", str(out / "shard-000000.tar")])
    assert check_data(cfg) == [str(out / "shard-000000.tar")]
    recipe = recipe_class("tatitok")(cfg, torch.device("cpu"))
    with torch.device("meta"):
        recipe.build_model()
    raw = next(iter(read_shard(str(out / "shard-000000.tar"))))
    got = recipe.decode_sample(raw, np.random.default_rng(3))["image"]
    want = random_resized_crop(decode_image(raw["jpg"]), recipe.crop, np.random.default_rng(3), cfg.data.random_flip)
    assert got.shape == (3, recipe.crop, recipe.crop) and torch.equal(got, want)


def test_killed_half_way_and_rerun(tmp_path):
    """SIGKILL once two shards are finished; the rerun keeps them byte for byte (same mtime
    and content), redoes the partial one, and the result holds every image once."""
    src, out = tmp_path / "train", tmp_path / "shards"
    truth = make_class_folder(src, per_class=140, size=192)  # 420 images, 84 shards of 5
    cmd = [sys.executable, "-m", "tatitok_fast.cli", "make-shards", str(src), "-o", str(out), "--shard-size", "5",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while len(list(out.glob("shard-*.tar"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    assert 2 <= len(finished) < 84, f"not killed half-way: {len(finished)} of 84 shards finished"
    again = run(str(src), "-o", str(out), "--shard-size", "5")
    assert again.returncode == 0, again.stderr
    assert f"{len(finished)} were already finished" in again.stdout
    for name, (mtime, data) in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime and (out / name).read_bytes() == data, name
    assert not list(out.glob(".*.partial"))
    check_every_image_once(src, out, truth)


@pytest.mark.slow  # four CLI runs with worker processes: 34 s
def test_workers_and_parts_write_the_same_shards(tmp_path):
    src = tmp_path / "train"
    make_class_folder(src, per_class=5)
    one, many, parts = tmp_path / "one", tmp_path / "many", tmp_path / "parts"
    assert run(str(src), "-o", str(one), "--shard-size", "4").returncode == 0
    assert run(str(src), "-o", str(many), "--shard-size", "4", "--workers", "2").returncode == 0
    for i in range(2):
        proc = run(str(src), "-o", str(parts), "--shard-size", "4", "--part-index", str(i), "--num-parts", "2")
        assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in one.glob("shard-*.tar"))
    assert len(names) == 4
    for d in (many, parts):
        assert sorted(p.name for p in d.glob("shard-*.tar")) == names
        for n in names:
            assert (d / n).read_bytes() == (one / n).read_bytes(), (d, n)


def test_plain_image_folder_has_no_labels(tmp_path):
    src, out = tmp_path / "imgs", tmp_path / "shards"
    (src / "a").mkdir(parents=True)
    for i, rel in enumerate(["x.png", "a/y.png"]):
        Image.fromarray(np.full((8, 8, 3), i * 50, dtype=np.uint8)).save(src / rel)
    proc = run(str(src), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    samples = read_all(out)
    assert sorted(json.loads(s["json"])["source"] for s in samples) == ["a/y.png", "x.png"]
    assert not any("cls" in s for s in samples) and not (out / "classes.json").exists()


@pytest.mark.parametrize("case, fragment", [
    ("missing", "is not a folder"),
    ("changed", "another listing"),
    # a CLI run each (7 s): two in CI, two in the slow tier
    pytest.param("labels", "outside the class folders", marks=pytest.mark.slow),
    pytest.param("part", "--part-index", marks=pytest.mark.slow),
])
def test_bad_input_is_one_error_line(tmp_path, case, fragment):
    src, out = tmp_path / "train", tmp_path / "shards"
    make_class_folder(src, per_class=2, size=8)
    args = [str(src), "-o", str(out)]
    if case == "missing":
        args[0] = str(tmp_path / "nope")
    elif case == "changed":
        assert run(*args).returncode == 0
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(src / CLASSES[1] / "extra.png")
    elif case == "labels":
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(src / "stray.png")
        args += ["--labels", "folders"]
    else:
        args += ["--part-index", "2", "--num-parts", "2"]
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr.splitlines()[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------
# tokenize: class-labelled token shards (make-shards output, class folders, official jsonl)

@pytest.fixture(scope="module")
def tiny_titok(tmp_path_factory):
    """A random tiny single-stage TiTok (16 tokens of 64 codes: the tiny MaskGIT's token space)."""
    import torch

    from tatitok_fast import TiTok
    from tatitok_fast.presets import tiny_titok_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("titok") / "tiny_titok"
    TiTok(tiny_titok_config("vq", tokens=16)).save_pretrained(path)
    return path


def tokenize(*args: str):
    from tatitok_fast.cli import main

    return main(["tokenize", *args, "--device", "cpu", "--dtype", "fp32", "--no-progress", "--batch-size", "4"])


def token_samples(out: Path) -> list[dict]:
    from tatitok_fast.token_shards import decode_class_token_sample

    raws = [s for p in sorted(out.glob("tokens-*.tar")) for s in read_shard(str(p))]
    return [{**decode_class_token_sample(r, num_tokens=16, codebook_size=64, num_classes=3),
             "source": json.loads(r["json"]).get("source", ""), "meta": json.loads(r["json"])} for r in raws]


@pytest.mark.parametrize("via", ["shards", "folder"])
def test_tokenize_labels_from_shards_and_class_folders(tmp_path, tiny_titok, via):
    """Tokens = the TiTok API's tokens of the same image; class = the image's folder; json records
    the tokenizer's codebook size and token count."""
    import torch

    from tatitok_fast import TiTok

    src, shards, out = tmp_path / "train", tmp_path / "shards", tmp_path / "tokens"
    truth = make_class_folder(src, per_class=3)
    if via == "shards":
        assert run(str(src), "-o", str(shards), "--shard-size", "4").returncode == 0
        inputs = [str(shards / "shard-{000000..000002}.tar")]
    else:
        inputs = [str(src)]
    assert tokenize(*inputs, "--tokenizer", str(tiny_titok), "--labels", "-o", str(out)) == 0
    got = token_samples(out)
    assert len(got) == len(truth)
    model = TiTok.from_pretrained(tiny_titok).eval()
    for s in got:
        if via == "folder":
            rel = Path(s["source"]).relative_to(src).as_posix()
        else:  # the make-shards sample key -> its source via the image shard's json
            key = s["source"].rsplit(":", 1)[1].split(".")[0]
            image_sample = next(x for x in read_all(shards) if x["__key__"] == key)
            rel = json.loads(image_sample["json"])["source"]
        assert s["label"] == truth[rel], rel
        with torch.no_grad():
            want = model.tokenize([Image.open(src / rel).convert("RGB")]).reshape(-1)
        assert torch.equal(s["tokens"], want), rel
        assert s["meta"]["codebook_size"] == 64 and s["meta"]["num_tokens"] == 16


def test_tokenize_labels_refuses_unlabelled_inputs(tmp_path, tiny_titok, capsys):
    src, shards = tmp_path / "imgs", tmp_path / "shards"
    src.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(src / "x.png")
    assert run(str(src), "-o", str(shards)).returncode == 0  # no classes: no .cls
    assert tokenize(str(shards / "shard-000000.tar"), "--tokenizer", str(tiny_titok), "--labels",
                    "-o", str(tmp_path / "t")) != 0
    assert "no class label" in capsys.readouterr().err


def test_tokenize_from_official_jsonl(tmp_path):
    """The official pretokenization format -> class-labelled token shards with the same ids."""
    rows = [{"class_id": i % 3, "tokens": [(7 * i + j) % 64 for j in range(16)]} for i in range(7)]
    jsonl = tmp_path / "pretokenized.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "tokens"
    assert tokenize("--from-jsonl", str(jsonl), "--codebook-size", "64", "-o", str(out), "--shard-size", "3") == 0
    assert len(list(out.glob("tokens-*.tar"))) == 3
    got = token_samples(out)
    assert [s["label"] for s in got] == [r["class_id"] for r in rows]
    assert [s["tokens"].tolist() for s in got] == [r["tokens"] for r in rows]


@pytest.mark.parametrize("line, args, fragment", [
    ('{"class_id": 1, "tokens": [1, 2, 99]}', ["--codebook-size", "64"], "[0, 64)"),
    ('{"class": 1, "tokens": [1, 2]}', ["--codebook-size", "64"], "class_id"),
    ('{"class_id": 1, "tokens": [1, 2]}', [], "--codebook-size"),
])
def test_tokenize_jsonl_errors(tmp_path, capsys, line, args, fragment):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(line + "\n")
    assert tokenize("--from-jsonl", str(jsonl), *args, "-o", str(tmp_path / "o")) != 0
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err, err


@pytest.mark.slow  # 11 s; each command of it runs in CI on its own
def test_pipeline_class_folder_to_maskgit_samples(tmp_path, tiny_titok):
    """make-shards -> tokenize --labels -> `tatitok-fast train` maskgit_tiny with sample grids
    decoded by the same TiTok and gFID every 2 steps: the run writes its grid (4 classes, TiTok's
    32 px images), and the logged FID is what `tatitok-fast eval fid` gives on the same samples."""
    import torch

    from tatitok_fast import ImageBert, TiTok
    from tatitok_fast.cli import main

    src, shards, tokens, run_dir = (tmp_path / n for n in ("train", "shards", "tokens", "run"))
    ref = tmp_path / "ref.npz"  # an ADM-style reference batch
    np.savez(ref, arr_0=np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    make_class_folder(src, per_class=4)
    assert run(str(src), "-o", str(shards), "--shard-size", "6").returncode == 0
    assert tokenize(str(shards / "shard-{000000..000001}.tar"), "--tokenizer", str(tiny_titok), "--labels",
                    "-o", str(tokens)) == 0
    rc = main(["train", "--config", str(ROOT / "training" / "recipes" / "maskgit_tiny.toml"),
               "--data.shards", str(tokens / "tokens-000000.tar"), "--job.dump_folder", str(run_dir),
               "--data.num_workers", "0", "--data.shuffle_buffer", "0", "--training.local_batch_size", "4",
               "--training.steps", "2", "--checkpoint.enable", "false", "--metrics.progress", "false",
               "--metrics.enable_tensorboard", "false", "--model.tokenizer", str(tiny_titok),
               "--samples.interval", "2", "--eval.interval", "2", "--eval.reference", str(ref),
               "--eval.num_samples", "6", "--eval.inception_weights", "random", "--metrics.log_freq", "1"])
    assert rc == 0
    grid = Image.open(run_dir / "samples" / "generated-step-2.png")
    assert grid.size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # make_grid: 4 images of 32 px, 2 px padding
    export = run_dir / "export" / "step-2"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    fid = [m["eval/fid"] for m in logged if "eval/fid" in m]
    assert len(fid) == 1 and np.isfinite(fid[0]) and fid[0] > 0
    # the same 6 samples (classes 0..5, the run's seed, the export = the EMA weights it evaluated)
    # through `tatitok-fast eval fid` give the same number
    gen = ImageBert.from_pretrained(export).eval()
    g = gen.config["model"]["generator"]
    rng = torch.Generator().manual_seed(42)  # one generator over the run's batches of 4 classes
    with torch.no_grad():
        ids = torch.cat([gen.generate(c, guidance_scale=g["guidance_scale"], guidance_decay=g["guidance_decay"],
                                      randomize_temperature=g["randomize_temperature"],
                                      num_sample_steps=g["num_steps"], generator=rng, use_cuda_graph=False)
                         for c in (torch.arange(4), torch.arange(4, 6))])
        x = TiTok.from_pretrained(tiny_titok).eval().detokenize(ids.view(6, 1, -1)).float().clamp(0, 1)
    np.savez(tmp_path / "samples.npz", arr_0=(x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    assert main(["eval", "fid", "--samples", str(tmp_path / "samples.npz"), "--ref", str(ref), "--device", "cpu",
                 "--inception-weights", "random", "-o", str(tmp_path / "fid.json"), "--no-progress",
                 "--batch-size", "4"]) == 0  # the run's batches (the FID of 6 samples moves with batching)
    want = json.loads((tmp_path / "fid.json").read_text())["metrics"]["fid"]
    assert abs(fid[0] - want) <= 1e-4 * abs(want), (fid[0], want)
