"""The demo's output-directory checks (before any work), and `tatitok-fast demo --quick` end to
end: data, tokenizer training, tokenize, generator training, generate + score, report."""
import json

import pytest

from tatitok_fast import TATiTok
from tatitok_fast.cli import main
from tatitok_fast.demo import curves, run, shapes
from tatitok_fast.models.generators.maskgen import load_generator


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
    assert main(["demo", "--out", str(blocker / "out"), "--quick"]) == 2
    assert f"--out {blocker / 'out'}: cannot write there" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--quick"]) == 2  # holds a_file
    assert "exists and is not empty; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_quick_plan_keeps_a_mix_of_prompts():
    full, quick = run.test_prompts(run.PLANS["full"]), run.test_prompts(run.PLANS["quick"])
    assert full == {s: shapes.test_prompts(s) for s in ("seen", "held_out")}
    for split in ("seen", "held_out"):
        assert len(quick[split]) == 6 and quick[split][0] == full[split][0] and quick[split][-1] == full[split][-1]
        assert {len(p["objects"]) for p in quick[split]} == {1, 2}


# ---------------------------------------------------------------------------------------
# The whole demo, quick mode: every stage through the same code users run

@pytest.mark.slow  # CI runs the full demo in its install block
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    for name in ("report.json", "report.md", "grid.png", "curves.png", "tokenizer/config.json",
                 "tokenizer/model.safetensors",
                 "generator/config.json", "generator/model.safetensors", "runs/tokenizer/metrics.jsonl",
                 "runs/generator/metrics.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "runs" / "tokenizer" / "tb").iterdir()) and any((out / "runs" / "generator" / "tb").iterdir())
    results = json.loads((out / "report.json").read_text())
    assert results["quick"] is True and set(results["adherence"]) == {"trained", "untrained"}
    assert 0 < results["tokenizer"]["psnr"] < 100 and results["detector_on_data"]["color_acc"] >= 0.98
    assert 10 < results["tokenizer"]["mean_image_psnr"] < 20  # white backgrounds: ~13.6 dB
    psnr_curve = curves.read_series(out / "runs" / "tokenizer" / "metrics.jsonl", "eval/psnr")
    assert len(psnr_curve) >= 2 and psnr_curve[-1][0] == run.PLANS["quick"].tokenizer_steps
    for gen in ("trained", "untrained"):
        for split in ("seen", "held_out"):
            assert 0 <= results["adherence"][gen][split]["color_acc"] <= 1
    tok = TATiTok.from_pretrained(out / "tokenizer")
    gen = load_generator(out / "generator")
    assert tok.config["model"]["text_encoder"] == gen.config["model"]["text_encoder"] == run.TEXT_ENCODER
    images = tmp_path / "images"  # afterwards: generate offline with no extra flags
    assert main(["generate", "a green triangle", "--generator", str(out / "generator"), "--tokenizer",
                 str(out / "tokenizer"), "-o", str(images), "--no-progress"]) == 0
    assert (images / "grid.png").is_file()
