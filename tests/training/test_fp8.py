"""FP8 conversion (training/fp8.py) on the tiny recipes, on CPU: which projections convert
(the exact count, computed here from the module tree and the documented rules), torchao's
emulated Float8 matmuls really change the numbers (close to fp32, not equal), the TE swap
keeps requires_grad and pads the rows so that a batch of 6 meets TE's shape limits, and a
run where nothing would convert is refused. The TE path itself runs where TE imports."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.benchmarks.train import Step
from tatitok_fast.models.nn.layers import FastLinear
from tatitok_fast.training import fp8
from tatitok_fast.training.config import FP8

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
TINY = ["tatitok_vq_tiny", "tatitok_vae_tiny", "maskgen_vq_tiny", "maskgen_kl_tiny"]
BATCH = 6  # not a multiple of 8 or 16: B-row and B*77-row layers break TE's / _scaled_mm's limits


def expected_fp8_layers(model: nn.Module, min_features: int) -> list[str]:
    """The documented rules (fp8.py's docstring), restated: an nn.Linear (subclasses too) that
    is not MHA's out_proj, in and out features divisible by 16 and >= min_features, no fqn
    component "lm_head" or starting with "embed"."""
    out = []
    for name, m in model.named_modules():
        if type(m) not in (nn.Linear, FastLinear):  # the two projection classes the models build
            continue
        parts = name.split(".")
        if m.in_features % 16 or m.out_features % 16 or min(m.in_features, m.out_features) < min_features:
            continue
        if "lm_head" in parts or any(p.startswith("embed") for p in parts):
            continue
        out.append(name)
    return out


@pytest.fixture(scope="module", params=TINY)
def case(request):
    torch.manual_seed(0)
    return request.param, Step(RECIPES / f"{request.param}.toml", "cpu", BATCH, quick=False, loss=False)


def loss_of(case: Step, model: nn.Module) -> torch.Tensor:
    """The recipe's loss for MaskGen; for the tokenizer, the reconstruction MSE (its loss
    module, not built here, adds perceptual and GAN terms outside the model). Fixed seed: the
    KL posterior and the diffusion loss draw noise."""
    torch.manual_seed(1)
    if case.cfg.job.recipe == "tatitok":
        recon, _ = model(case.batch["image"], case.batch["guidance"])
        return F.mse_loss(recon.float(), case.batch["image"])
    return case.recipe.forward_loss(model, case.batch, 1).loss


def test_eligible_rules_on_plain_modules():
    from torchao.float8.float8_linear import Float8Linear

    assert fp8.eligible(nn.Linear(64, 128), "blocks.0.attn.to_q", 64)
    assert fp8.eligible(FastLinear(64, 128), "blocks.0.attn.to_q", 64)  # the models' nn.Linear subclass
    assert fp8.eligible(FastLinear(64, 64), "text_embed_proj", 64)  # a projection named *_embed*
    assert not fp8.eligible(FastLinear(64, 64), "embeddings", 64)
    assert not fp8.eligible(FastLinear(64, 64), "lm_head", 64)
    assert not fp8.eligible(FastLinear(64, 72), "x", 64)  # 72 % 16
    assert not fp8.eligible(FastLinear(32, 64), "x", 64)  # below min_features
    assert not fp8.eligible(nn.MultiheadAttention(64, 4).out_proj, "attn.out_proj", 64)
    assert not fp8.eligible(Float8Linear.from_float(nn.Linear(64, 64)), "x", 64)  # already converted
    assert not fp8.eligible(fp8.padded_linear_class(nn.Linear, 16)(64, 64), "x", 64)
    assert not fp8.eligible(nn.Conv1d(64, 64, 1), "x", 64)


def test_torchao_converts_the_expected_layers_and_changes_the_numbers(case):
    name, step = case
    cfg = FP8(backend="torchao", emulate=True, min_features=step.cfg.fp8.min_features)
    model = step.model
    expected = expected_fp8_layers(model, cfg.min_features)
    total = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert 0 < len(expected) < total or len(expected) == total > 0

    f8 = copy.deepcopy(model)
    plan = fp8.apply_fp8(f8, cfg, fsdp=False, device=torch.device("cpu"))
    from torchao.float8.float8_linear import Float8Linear

    converted = sorted(n for n, m in f8.named_modules() if isinstance(m, Float8Linear))
    assert converted == sorted(expected)
    assert (plan.converted, plan.total) == (len(expected), total)
    assert plan.summary() == f"fp8: {len(expected)} of {total} projections converted (torchao, tensorwise, emulated)"

    ref = loss_of(step, model)
    got = loss_of(step, f8)
    assert torch.isfinite(got)
    assert got.item() != ref.item(), f"{name}: the Float8 run gave the fp32 loss exactly: no FP8 matmul ran"
    # MaskGen-KL's diffusion loss (its variational-bound term at small t) amplifies e4m3's ~6 %
    # rounding: 1.5-11 % over five batches of draws; the other losses stay within 5 %
    rtol = 0.15 if name == "maskgen_kl_tiny" else 0.05
    torch.testing.assert_close(got, ref, rtol=rtol, atol=1e-3)
    got.backward()
    for n, p in f8.named_parameters():
        if p.requires_grad and n.rsplit(".", 1)[0] in expected:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_torchao_config_pads_the_token_dimension():
    for recipe in ("auto", "tensorwise", "rowwise", "rowwise_with_gw_hp"):
        for fsdp in (False, True):
            c = fp8.torchao_config(FP8(backend="torchao", recipe=recipe), fsdp=fsdp, emulate=True)
            assert c.pad_inner_dim and c.emulate
            assert c.enable_fsdp_float8_all_gather == (fsdp and recipe in ("auto", "tensorwise"))


def test_nothing_eligible_is_an_error_before_the_model_changes():
    step = Step(RECIPES / "maskgen_vq_tiny.toml", "cpu", BATCH, quick=False, loss=False)
    model = step.model
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=r"fp8.min_features = 100000.*fp8.backend = 'none'"):
        fp8.apply_fp8(model, FP8(backend="torchao", emulate=True, min_features=100_000), False, torch.device("cpu"))
    assert [type(m) for m in model.modules()] == before


# ---------------------------------------------------------------------------------------
# The TE swap, with plain modules standing in for te.Linear

def test_copy_linear_params_keeps_values_and_requires_grad():
    src = nn.Linear(32, 48)
    src.weight.requires_grad_(False)
    dst = nn.Linear(32, 48)
    fp8.copy_linear_params(src, dst)
    assert torch.equal(dst.weight, src.weight) and torch.equal(dst.bias, src.bias)
    assert (dst.weight.requires_grad, dst.bias.requires_grad) == (False, True)
    src2, dst2 = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
    fp8.copy_linear_params(src2, dst2)
    assert dst2.weight.requires_grad and torch.equal(dst2.weight, src2.weight)


class RowCheckLinear(nn.Linear):
    """nn.Linear with TE's FP8 shape limit (rows = product of the leading dims divisible by
    8, TE's assert_dim_for_fp8_exec); records the rows it saw."""

    seen: list[int] = []

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if rows % 8:
            raise AssertionError(f"FP8 execution requires rows divisible by 8, got {tuple(x.shape)}")
        RowCheckLinear.seen.append(rows)
        return F.linear(x, self.weight, self.bias)


def _swap(model, cfg, cls):
    return fp8.swap_linears(model, cfg, lambda lin: cls(lin.in_features, lin.out_features, bias=lin.bias is not None))


def test_pad_rows_call_matches_unpadded():
    lin = nn.Linear(64, 32)
    x = torch.randn(BATCH, 77, 64, requires_grad=True)
    shapes = []
    out = fp8.pad_rows_call(lambda t: (shapes.append(t.shape), lin(t))[1], x, 16)
    assert out.shape == (BATCH, 77, 32) and shapes == [torch.Size([464, 64])]  # 462 rows -> 29 x 16
    torch.testing.assert_close(out, lin(x))
    g = torch.randn_like(out)
    (gx, gw, gb) = torch.autograd.grad(out, (x, lin.weight, lin.bias), g)
    (rx, rw, rb) = torch.autograd.grad(lin(x), (x, lin.weight, lin.bias), g)
    torch.testing.assert_close((gx, gw, gb), (rx, rw, rb))


def test_te_style_swap_meets_the_row_limit_at_batch_6(case):
    """Every eligible layer swapped for a row-checking Linear: unpadded, batch 6 fails (the
    per-sample and text-stream layers see 6 and 6 x 77 rows); padded, it runs, gives the same
    loss and gradients, and keeps requires_grad (MaskGen's frozen add_q_proj included)."""
    name, step = case
    cfg = FP8(backend="te", min_features=step.cfg.fp8.min_features)
    expected = expected_fp8_layers(step.model, cfg.min_features)

    bare = copy.deepcopy(step.model)
    assert _swap(bare, cfg, RowCheckLinear) == len(expected)
    with pytest.raises(AssertionError, match="rows divisible by 8"):
        loss_of(step, bare)

    padded = copy.deepcopy(step.model)
    assert _swap(padded, cfg, fp8.padded_linear_class(RowCheckLinear, 16)) == len(expected)
    assert sorted(n for n, m in padded.named_modules() if isinstance(m, RowCheckLinear)) == sorted(expected)
    assert {n: p.requires_grad for n, p in padded.named_parameters()} == \
        {n: p.requires_grad for n, p in step.model.named_parameters()}
    if step.cfg.job.recipe == "maskgen":
        assert any(not p.requires_grad for p in padded.parameters())  # the context-pre-only add_q_proj
    RowCheckLinear.seen = []
    got = loss_of(step, padded)
    assert RowCheckLinear.seen and all(r % 16 == 0 for r in RowCheckLinear.seen)
    ref_model = copy.deepcopy(step.model)
    ref = loss_of(step, ref_model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    grads = dict(ref_model.named_parameters())
    for n, p in padded.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=2e-5)  # fp32 GEMM blocking
        else:
            assert p.grad is None, n


def test_te_swap_on_gpu_keeps_requires_grad():
    """Where Transformer Engine imports (a GPU machine with TE): the real swap."""
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError):
        pytest.skip("Transformer Engine is not installed here")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 GPU")
    step = Step(RECIPES / "maskgen_vq_tiny.toml", "cuda", BATCH, quick=False)
    model = step.model.cuda()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen
    expected = expected_fp8_layers(model, step.cfg.fp8.min_features)
    plan = fp8.apply_fp8(model, FP8(backend="te", min_features=step.cfg.fp8.min_features), False,
                         torch.device("cuda"))
    assert sorted(n for n, m in model.named_modules() if isinstance(m, te.Linear)) == sorted(expected)
    assert plan.converted == len(expected) > 0
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    with torch.autocast("cuda", dtype=torch.bfloat16), plan.autocast():
        loss = step.recipe.forward_loss(model, step.batch, 1).loss
    loss.backward()
    assert torch.isfinite(loss)
