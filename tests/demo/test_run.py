"""The demo's output-directory checks (before any work), and its stages that need no training
engine, run on tiny random models: data, tokenizer metrics, tokenize, generate + score, report."""
import json

import pytest
import torch

from tatitok_fast import TATiTok
from tatitok_fast.cli import main
from tatitok_fast.demo import run, shapes
from tatitok_fast.models import tatitok as tatitok_module
from tatitok_fast.models.maskgen import MaskGen_VQ
from tatitok_fast.presets import tiny_generator_config, tiny_tokenizer_config
from tatitok_fast.text import CLIPTextEncoder


# ---------------------------------------------------------------------------------------
# Output directory

def test_non_empty_dir_needs_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "report.md").write_text("old report")
    (tmp_path / "data").mkdir()
    with pytest.raises(run.DemoError, match="exists and is not empty; pass --force"):
        run.run_demo(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt", "report.md"]  # untouched
    run.prepare_out_dir(tmp_path, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # only the demo's own outputs go


def test_unwritable_or_bad_dir_fails_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(run.DemoError, match="cannot write there"):
        run.run_demo(blocker / "out")  # a path under a regular file can never be created
    with pytest.raises(run.DemoError, match="exists and is not a directory"):
        run.prepare_out_dir(blocker)
    with pytest.raises(run.DemoError, match="--seed: expected an int >= 0"):
        run.run_demo(tmp_path / "new", seed=-1)
    assert not (tmp_path / "new").exists()
    assert main(["demo", "--out", str(blocker / "out"), "--quick"]) == 1
    assert f"--out {blocker / 'out'}: cannot write there" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 1  # holds a_file
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_quick_plan_keeps_a_mix_of_prompts():
    full, quick = run.test_prompts(run.PLANS["full"]), run.test_prompts(run.PLANS["quick"])
    assert full == {s: shapes.test_prompts(s) for s in ("seen", "held_out")}
    for split in ("seen", "held_out"):
        assert len(quick[split]) == 6 and quick[split][0] == full[split][0] and quick[split][-1] == full[split][-1]
        assert {len(p["objects"]) for p in quick[split]} == {1, 2}


# ---------------------------------------------------------------------------------------
# Stages on tiny random models

@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    size = "tiny" if "tiny" in getattr(tatitok_module, "VIT_SIZES", {}) else "small"
    cfg = tiny_tokenizer_config("vq")
    cfg["model"]["vq_model"].update(vit_enc_model_size=size, vit_dec_model_size=size)
    gen_cfg = tiny_generator_config("vq")
    return (TATiTok(cfg).eval(), MaskGen_VQ(gen_cfg).eval(), MaskGen_VQ(gen_cfg).eval(),
            CLIPTextEncoder.from_spec(run.TEXT_ENCODER))


def test_stages_without_training(tmp_path, models):
    tokenizer, trained, untrained, text_encoder = models
    plan = run.Plan(train_images=12, eval_images=4, samples_per_prompt=2, tokenizer_steps=1, generator_steps=1,
                    shard_size=5, detector_check_images=20)
    out = run.prepare_out_dir(tmp_path / "demo")

    shards, on_data = run.make_data(out / "data", plan, seed=0, progress=False)
    assert [p.name for p in shards] == [f"shapes-{i:06d}.tar" for i in range(3)]
    assert on_data["num_images"] == 20 and on_data["color_acc"] >= 0.98 and on_data["shape_acc"] >= 0.98

    tokenizer.save_pretrained(tmp_path / "export")  # what the engine would export (no text_encoder entry)
    tok_dir = run._install_export(tmp_path / "export", out / "tokenizer")
    assert json.loads((tok_dir / "config.json").read_text())["model"]["text_encoder"] == run.TEXT_ENCODER
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    cfg["model"]["text_encoder"] = {"name": "tiny", "seed": 9}
    (tmp_path / "export" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="the demo trains with"):
        run._install_export(tmp_path / "export", out / "tokenizer_again")

    metrics, pairs = run.evaluate_tokenizer(tokenizer, text_encoder, plan, seed=0)
    assert metrics["num_images"] == 4 and 0 < metrics["psnr"] < 100
    assert 1 <= metrics["codes_used"] <= 4 * tokenizer.num_latent_tokens and metrics["codebook_size"] == 64
    assert len(pairs) == 4 and pairs[0][0].size == (32, 32)

    token_shards = run.tokenize_data(shards, tok_dir, out / "tokens", progress=False)
    import webdataset as wds
    assert sum(1 for _ in wds.WebDataset([str(p) for p in token_shards], shardshuffle=False)) == 12

    prompts = {"seen": shapes.test_prompts("seen")[:1], "held_out": shapes.test_prompts("held_out")[-1:]}
    adherence, images = run.generate_and_score({"trained": trained, "untrained": untrained}, tokenizer, text_encoder,
                                               plan, seed=0, prompts=prompts, samples_dir=out / "samples",
                                               progress=False)
    for gen in ("trained", "untrained"):
        assert adherence[gen]["seen"]["num_images"] == 2 and adherence[gen]["held_out"]["num_objects"] == 4
        assert 0 <= adherence[gen]["seen"]["color_acc"] <= 1
        assert len(list((out / "samples" / gen / "held_out").glob("*.png"))) == 2
    assert images["trained"]["held_out"][0][0] == prompts["held_out"][0]["caption"]
    again, again_images = run.generate_and_score({"trained": trained}, tokenizer, text_encoder, plan, seed=0,
                                                 prompts={"seen": prompts["seen"]}, progress=False)
    assert again["trained"]["seen"] == adherence["trained"]["seen"]  # seeded
    assert [im.tobytes() for im in again_images["trained"]["seen"][0][1]] == \
        [im.tobytes() for im in images["trained"]["seen"][0][1]]

    run.write_outputs(out, {"adherence": adherence, "tokenizer": metrics}, images, pairs)
    assert {"report.json", "report.md", "grid.png"} <= {p.name for p in out.iterdir()}
