"""The MaskGIT generator recipe (training/recipes/maskgit_tiny.toml, job.recipe = "maskgit") on
real class-labelled token shards: the training loss against the official ImageBert forward +
MLMLoss on the same weights, inputs and masks; `tatitok-fast train` end to end (the loss goes
down, the export loads with our ImageBert and the official one and gives the same logits);
exact resume; and the up-front data errors (another tokenizer's tokens, shards without labels)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tatitok_fast.training.train import main
from tests.training.shards import write_token_shards

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "training" / "recipes" / "maskgit_tiny.toml"


def write_labelled_token_shards(out: Path, *, shards: int = 2, per_shard: int = 32, num_tokens: int = 16,
                                codebook_size: int = 64, num_classes: int = 10, seed: int = 0,
                                labels: bool = True) -> list[str]:
    """Class-labelled VQ token shards (what `tatitok-fast tokenize --labels` writes): class c
    draws its ids from its own range (c * K / C ...), so the class is learnable."""
    import webdataset as wds

    from tatitok_fast.token_shards import encode_class_token_sample, encode_token_sample, shard_metadata

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    meta = shard_metadata(tokenizer="test", mode="vq", num_tokens=num_tokens, token_size=8,
                          codebook_size=codebook_size)
    width = codebook_size // num_classes
    paths = []
    for s in range(shards):
        path = out / f"tokens-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(per_shard):
                c = int(rng.integers(num_classes))
                tokens = rng.integers(c * width, (c + 1) * width, num_tokens)
                key = f"s{s}_{i:05d}"
                sink.write(encode_class_token_sample(key, tokens, c, meta) if labels
                           else encode_token_sample(key, tokens, "a thing", 6.0, meta))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskgit_shards")
    return {"labelled": write_labelled_token_shards(root / "labelled"),
            "unlabelled": write_labelled_token_shards(root / "unlabelled", shards=1, labels=False),
            "other_codebook": write_labelled_token_shards(root / "cb", shards=1, codebook_size=128),
            "other_length": write_labelled_token_shards(root / "len", shards=1, num_tokens=32)}


def argv(shards: list[str], run: Path, *extra: str) -> list[str]:
    return ["--config", str(RECIPE), "--data.shards", ",".join(shards), "--job.dump_folder", str(run),
            "--data.num_workers", "0", "--training.local_batch_size", "8", "--metrics.log_freq", "1",
            "--metrics.progress", "false", "--metrics.enable_tensorboard", "false", *extra]


def logged(run: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (run / "metrics.jsonl").read_text().splitlines()]


def official_maskgit():
    from tests.models.official_losses import import_official

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return import_official("modeling.maskgit", deps=("transformers", "omegaconf", "einops", "huggingface_hub"))


# ---------------------------------------------------------------------------------------
# The loss against the official training step

@pytest.mark.parametrize("config", ["tiny_maskgit", "tiny_uvit"])
def test_training_loss_matches_official_mlm_loss(config, shards):
    """Our recipe's batch_transform + forward_loss against the official forward (same weights,
    dropout off, same masked inputs and labels) followed by the official MLMLoss: <= 1e-5
    relative, and the masked accuracy equal."""
    from omegaconf import OmegaConf

    from tatitok_fast.training.config import load_config
    from tatitok_fast.training.data import read_shard
    from tatitok_fast.training.recipes.maskgit import official_state_dict
    from tatitok_fast.training.spec import recipe_class

    off = official_maskgit()
    losses = __import__("tests.models.official_losses", fromlist=["import_official"]).import_official(
        "modeling.modules.losses")
    cfg = load_config(RECIPE, ["--data.shards", shards["labelled"][0], "--model.config", config,
                               "--loss.class_label_dropout", "0.5"])
    recipe = recipe_class("maskgit")(cfg, torch.device("cpu"))
    ours = recipe.build_model().eval()
    ref_cls = off.ImageBert if config == "tiny_maskgit" else off.UViTBert
    ref = ref_cls(OmegaConf.create(copy.deepcopy(ours.config))).eval()
    ref.load_state_dict(official_state_dict(ours), strict=True)  # the trained model keeps a fused qkv
    raws = [r for _, r in zip(range(8), read_shard(shards["labelled"][0]))]
    batch = recipe.batch_transform(recipe.collate([recipe.decode_sample(r, np.random.default_rng(i))
                                                    for i, r in enumerate(raws)]))
    assert batch["label_dropped"].any() and not batch["label_dropped"].all()  # both kinds of rows are in it
    out = recipe.forward_loss(ours, batch, 0)
    with torch.no_grad():  # the official: dropped labels are the class-drop token, as its cond_drop_prob does
        logits = ref(batch["input_ids"], batch["label"], cond_drop_prob=0.0)
        drop_logits = ref(batch["input_ids"], batch["label"], cond_drop_prob=1.0)
        logits = torch.where(batch["label_dropped"][:, None, None], drop_logits, logits)
        mlm = losses.MLMLoss(OmegaConf.create({"losses": {"label_smoothing": 0.1, "loss_weight_unmasked_token": 0.1}}))
        want, logs = mlm(logits, batch["tokens"], batch["masks"])
    assert abs(out.loss.item() - want.item()) <= 1e-5 * abs(want.item()), (out.loss.item(), want.item())
    assert abs(out.metrics["masked_accuracy"].item() - logs["correct_tokens"].item()) < 1e-6
    # the masks are the official masking_input_tokens draws: every row has >= 1 masked token, ids set to K
    assert batch["masks"].sum(1).min() >= 1
    assert torch.equal(batch["input_ids"][batch["masks"]], torch.full_like(batch["input_ids"][batch["masks"]], 64))
    assert torch.equal(batch["input_ids"][~batch["masks"]], batch["tokens"][~batch["masks"]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_masks_are_the_official_draws(seed):
    """training_masks(n, generator) = the official masking_input_tokens of one row after
    torch.manual_seed (its global RNG), for the same seed."""
    from omegaconf import OmegaConf

    from tatitok_fast.training.recipes.maskgit import tiny_maskgit_config, training_masks

    off = official_maskgit()
    ref = off.ImageBert(OmegaConf.create(tiny_maskgit_config()))
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(9))
    for _ in range(5):
        torch.manual_seed(seed)
        masked, want = ref.masking_input_tokens(tokens.clone())
        got = training_masks(16, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want[0])
        assert torch.equal(masked[0], torch.where(got, 64, tokens[0]))
        seed += 100


# ---------------------------------------------------------------------------------------
# End to end

def test_trains_exports_and_loads_in_both_classes(shards, tmp_path):
    """40 steps through the train entry point: the loss of the last 10 steps is below that of the
    first 10; the export loads with our ImageBert and the official one and both give the same
    logits; the masked accuracy rose."""
    from tatitok_fast import ImageBert

    run = tmp_path / "run"
    assert main(argv(shards["labelled"], run, "--training.steps", "40", "--lr_scheduler.warmup_steps", "5",
                     "--training.local_batch_size", "16", "--checkpoint.enable", "false")) == 0
    loss, acc = logged(run), logged(run, "masked_accuracy")
    # uniform over 64 codes: ln 64 = 4.16; knowing the class's 6 ids: ln 6 = 1.79 (measured: 4.15 -> 3.0)
    assert np.mean(loss[-10:]) < 0.85 * np.mean(loss[:10]), loss
    assert np.mean(acc[-10:]) > np.mean(acc[:10]) + 0.1, acc  # measured 0.02 -> 0.23 (at most ~1/6 + noise)
    export = run / "export" / "step-40"
    ours = ImageBert.from_pretrained(export).eval()
    off = official_maskgit()
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    ref = off.ImageBert(OmegaConf.create(json.loads((export / "config.json").read_text()))).eval()
    ref.load_state_dict(load_file(str(export / "model.safetensors")), strict=True)
    ids = torch.randint(0, 65, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9])
    with torch.no_grad():
        a, b = ours(ids, labels, cond_drop_prob=0.0), ref(ids, labels, cond_drop_prob=0.0)
    assert ((a - b).norm() / b.norm()).item() < 1e-5
    gen = ours.generate(labels, num_sample_steps=4, randomize_temperature=0.0, guidance_scale=1.0)
    # class c's ids were drawn from [6c, 6c + 6): the trained generator stays mostly in its range
    in_range = ((gen >= 6 * labels[:, None]) & (gen < 6 * labels[:, None] + 6)).float().mean().item()
    assert in_range > 0.5, (gen, in_range)


def test_uvit_trains_and_exports_in_the_official_layout(shards, tmp_path):
    """model.config = tiny_uvit: the export is a UViTBert that the official UViTBert loads strictly
    with the same logits."""
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from tatitok_fast import ImageBert, UViTBert

    run = tmp_path / "run"
    assert main(argv(shards["labelled"], run, "--model.config", "tiny_uvit", "--training.steps", "3",
                     "--checkpoint.enable", "false")) == 0
    export = run / "export" / "step-3"
    ours = ImageBert.from_pretrained(export).eval()
    assert type(ours) is UViTBert
    ref = official_maskgit().UViTBert(OmegaConf.create(json.loads((export / "config.json").read_text()))).eval()
    ref.load_state_dict(load_file(str(export / "model.safetensors")), strict=True)
    ids, labels = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1)), torch.tensor([2, 10])
    with torch.no_grad():
        a, b = ours(ids, labels, cond_drop_prob=0.0), ref(ids, labels, cond_drop_prob=0.0)
    assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_resume_is_exact(shards, tmp_path):
    """K steps, stop, resume, K more == 2K uninterrupted (bitwise, fp32 CPU), EMA included."""
    from tests.training.test_engine import final_params, losses

    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--checkpoint.interval", "3", "--data.shuffle_buffer", "16", "--data.shuffle_initial", "8",
              "--training.steps", "6", "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2"]
    assert main(argv(shards["labelled"], full, *common)) == 0
    assert main(argv(shards["labelled"], split, *common, "--training.stop_after", "3")) == 0
    assert main(argv(shards["labelled"], split, *common)) == 0
    assert losses(split) == losses(full)
    a, b = final_params(full, "vq"), final_params(split, "vq")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------
# Bad data: an error before any training step

def launch(run: Path, shards: list[str]):
    cmd = [sys.executable, "-m", "tatitok_fast.cli", "train", *argv(shards, run, "--training.steps", "2")]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("kind, fragments", [
    ("other_codebook", ("codebook_size=128", "codebook_size=64")),
    # one subprocess launch each (7 s): the first in CI, the others in the slow tier
    pytest.param("other_length", ("num_tokens=32", "num_tokens=16"), marks=pytest.mark.slow),
    pytest.param("unlabelled", ("no class label", "cls", "--labels"), marks=pytest.mark.slow),
])
def test_bad_shards_fail_before_training(shards, tmp_path, kind, fragments):
    from tests.training.test_cli_errors import assert_user_error

    run = tmp_path / "run"
    proc = launch(run, shards[kind])
    assert_user_error(proc, run, "data.shards", "maskgit", *fragments)


def test_maskgen_token_shards_are_refused(tmp_path):
    """MaskGen's caption token shards (no cls) are not class-labelled either."""
    from tests.training.test_cli_errors import assert_user_error

    paths = write_token_shards(tmp_path / "maskgen", "vq", shards=1, per_shard=4)
    run = tmp_path / "run"
    assert_user_error(launch(run, paths), run, "no class label")


def test_missing_fid_reference_fails_before_training(shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tatitok_fast.cli", "train",
           *argv(shards["labelled"], run, "--training.steps", "2", "--eval.interval", "1",
                 "--eval.reference", str(tmp_path / "missing.npz"))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: eval.reference: no such file"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists()  # no step ran


def test_sample_classes_outside_the_model_fail_before_training(shards, tmp_path):
    from tatitok_fast.training.errors import ConfigError

    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"samples.prompts: .* class ids in \[0, 10\), got \[1, 10\]"):
        main(argv(shards["labelled"], run, "--samples.interval", "1", "--samples.prompts", "[1, 10]",
                  "--model.tokenizer", "any"))
    assert not (run / "metrics.jsonl").exists()
