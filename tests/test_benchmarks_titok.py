"""`bench tokenizer --model titok_*` and `bench generate --generator titok_*` (benchmarks/titok.py)
run for real in --quick mode on CPU against the official TiTok / ImageBert
(../shared/peer/1d-tokenizer, modeling/titok.py and maskgit.py; the latter needs transformers),
and their agreement checks: they pass on the same weights and fail on different ones."""
import argparse
import copy
import json

import pytest
import torch

from tatitok_fast.cli import main
from tests.helpers import OFFICIAL, require_official

QUICK = ["--quick", "--device", "cpu", "--no-progress", "--min-run-time", "0.01", "--rounds", "3"]
OFFICIAL_DEPS = ("transformers", "omegaconf", "einops", "huggingface_hub", "diffusers", "open_clip")


@pytest.fixture(scope="module")
def official_titok():
    require_official(OFFICIAL_DEPS)
    from tatitok_fast.benchmarks.titok import import_official_titok

    return import_official_titok(OFFICIAL)


def _rows(path, case):
    return {r["variant"]: r for r in json.loads(path.read_text())["rows"] if r["case"] == case}


def _check_official_rows(rows: dict, batch: int) -> None:
    """Official fp32 / autocast rows next to ours; speed-ups against the official row of the same
    precision and `vs official best` against the faster official row."""
    assert list(rows) == ["fp32 eager", "autocast bfloat16", "fp32", "fast bfloat16"]
    assert [r["impl"] for r in rows.values()] == ["official", "official", "tatitok_fast", "tatitok_fast"]
    ours, fast = rows["fp32"], rows["fast bfloat16"]
    assert ours["baseline"] == "official fp32 eager" and fast["baseline"] == "official autocast bfloat16"
    assert ours["speedup"] == pytest.approx(rows["fp32 eager"]["median_ms"] / ours["median_ms"])
    best = min(rows["fp32 eager"]["median_ms"], rows["autocast bfloat16"]["median_ms"])
    for r in rows.values():
        assert r["vs_official_best"] == pytest.approx(best / r["median_ms"])
        assert r["items_per_s"] == pytest.approx(batch / (r["median_ms"] * 1e-3))


def test_bench_tokenizer_titok_against_official(official_titok, tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", "tokenizer", *QUICK, "--model", "titok_bl128_vq8k", "--batch", "1", "--cases",
                 "encode,decode", "--variants", "official_fp32,official_autocast,fp32,fast", "--official",
                 str(OFFICIAL), "--json", str(out)]) == 0
    for case in ("encode", "decode"):
        rows = _rows(out, case)
        _check_official_rows(rows, 1)
        assert {r["shapes"] for r in rows.values()} == {"tiny B=1 32x32 N=8"}


def test_bench_generate_titok_class_to_image_against_official(official_titok, tmp_path):
    """A tiny ImageBert and a single-stage TiTok (the two-stage one's full-size MaskGIT-VQGAN pixel
    decoder is slow on a loaded CPU; its decode agreement is tested below): generate, decode and
    class-to-image, official rows in each."""
    out = tmp_path / "r.json"
    assert main(["bench", "generate", *QUICK, "--generator", "titok_l32", "--tokenizer", "titok_bl128_vq8k",
                 "--batch", "2", "--dtype", "bf16",
                 "--variants", "official_fp32,official_autocast,fp32,fast", "--official", str(OFFICIAL),
                 "--json", str(out)]) == 0
    cases = [r["case"] for r in json.loads(out.read_text())["rows"]]
    assert list(dict.fromkeys(cases)) == ["generate", "decode", "class-to-image"]  # no eager-loop case on CPU
    for case in ("generate", "decode", "class-to-image"):
        _check_official_rows(_rows(out, case), 2)
    assert {r["shapes"] for r in _rows(out, "class-to-image").values()} == {"tiny + tiny B=2 steps=4"}


def test_case_names_are_the_cases_built():
    from tatitok_fast.benchmarks import generate, titok

    args = argparse.Namespace(generator="titok_l32", tokenizer="titok_bl128_vq8k", no_decode=False, quick=True,
                              steps=2, batch=1, official=None, variants=["fast"], fast_dtype="bf16", device="cpu")
    built = [c.case for c in titok.generate_cases(args, "cpu", [])]
    assert generate.case_names(args) == built == ["generate", "decode", "class-to-image"]
    args.device = "cuda"
    assert generate.case_names(args)[-1] == titok.EAGER_LOOP_CASE
    args.no_decode = True
    assert generate.case_names(args) == [c.case for c in titok.generate_cases(args, "cpu", [])] == ["generate"]


def test_bench_titok_rejects_bad_options(capsys):
    for argv in (["bench", "tokenizer", "--quick", "--device", "cpu", "--model", "titok_ll32_vae_c16"],
                 ["bench", "tokenizer", "--quick", "--device", "cpu", "--model", "titok_xl"],
                 ["bench", "generate", "--quick", "--device", "cpu", "--generator", "titok_l32", "--tokenizer",
                  "tatitok_bl32_vq"],
                 ["bench", "generate", "--quick", "--device", "cpu", "--generator", "titok_l32", "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model: the TiTok benchmark times VQ tokenizers" in err and "'titok_xl'" in err
    assert "--tokenizer: a TiTok generator's ids decode with a TiTok" in err and "'fp8'" in err


# ---------------------------------------------------------------------------------------
# Agreement checks: pass on the same weights, fail loudly on different ones

def _tiny_tokenizer(name="titok_bl128_vq8k"):
    from tatitok_fast import TiTok
    from tatitok_fast.benchmarks.titok import _tiny_tokenizer_config

    torch.manual_seed(0)
    return TiTok(_tiny_tokenizer_config(name)).eval().requires_grad_(False)


@pytest.mark.parametrize("name", ["titok_bl128_vq8k", "titok_l32"])
def test_tokenizer_agreement_and_mismatches(official_titok, name):
    from tatitok_fast.benchmarks.official import AgreementError, official_model
    from tatitok_fast.benchmarks.titok import check_tokenizer_agreement

    ours = _tiny_tokenizer(name)
    fast = copy.deepcopy(ours).to(torch.bfloat16)
    x = torch.rand(2 if name == "titok_bl128_vq8k" else 1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    official = official_model(official_titok.TiTok, ours)
    check_tokenizer_agreement(ours, fast, official, x, "cpu", torch.bfloat16)  # same weights: passes

    decoder = official_model(official_titok.TiTok, ours)
    with torch.no_grad():
        decoder.decoder.ln_post.weight.mul_(30.0)  # another decoder, same encoder: the images differ
    with pytest.raises(AgreementError, match=r"TiTok decode_tokens \(fp32\): relative error"):
        check_tokenizer_agreement(ours, fast, decoder, x, "cpu", torch.bfloat16)

    codes = official_model(official_titok.TiTok, ours)
    with torch.no_grad():
        codes.quantize.embedding.weight.copy_(codes.quantize.embedding.weight.flip(0))  # permuted codebook
    with pytest.raises(AgreementError, match=r"TiTok encode \(VQ ids, fp32\): token ids differ"):
        check_tokenizer_agreement(ours, fast, codes, x, "cpu", torch.bfloat16)


def test_generate_agreement_and_a_mismatch(official_titok):
    from tatitok_fast import ImageBert
    from tatitok_fast.benchmarks.official import AgreementError
    from tatitok_fast.benchmarks.titok import (_tiny_tokenizer_config, check_generate_agreement, official_generator,
                                               tiny_generator_config)
    from tatitok_fast.pipeline import sampling_settings

    torch.manual_seed(0)
    ours = ImageBert(tiny_generator_config(_tiny_tokenizer_config("titok_l32"))).eval()
    with torch.no_grad():
        # peaked logits: a wrong model cannot match the ids by chance
        ours.get_parameter("model.lm_head.weight").mul_(50.0)
    settings = sampling_settings(ours)
    labels = torch.tensor([0, 3, 7])
    official = official_generator(official_titok.ImageBert, ours)
    check_generate_agreement(ours, official, labels, settings)  # same weights, same seed: equal ids
    with torch.no_grad():
        official.get_parameter("model.lm_head.weight").mul_(-1.0)
    with pytest.raises(AgreementError, match="MaskGIT generate .* token ids differ from the official ids"):
        check_generate_agreement(ours, official, labels, settings)
