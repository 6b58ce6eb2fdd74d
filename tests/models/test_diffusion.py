"""Gaussian diffusion (cosine schedule, respacing, LEARNED_RANGE, losses, sampling loop) against
numbers from the reference implementation (tests/fixtures/diffloss_ref.pt, see the README there)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tatitok_fast.models.generators.diffloss import DiffLoss
from tatitok_fast.models.generators.diffusion import GaussianDiffusion, cosine_betas, space_timesteps

REF_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "diffloss_ref.pt"


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF_PATH, weights_only=False)


@pytest.fixture(scope="module")
def ref_diffloss(ref):
    """DiffLoss with the fixture's synthetic weights (the model the reference numbers used)."""
    c = ref["config"]
    m = DiffLoss(c["token_size"], c["width"], c["depth"], c["z_channels"])
    m.load_state_dict(ref["weights"])
    return m


def _gauss_model(ac_full: torch.Tensor, data_var: float):
    """Exact epsilon of N(0, data_var I) data, with a fixed v: keeps sampled values O(1)."""
    def model(x, ts):
        a = ac_full[ts][:, None]
        eps = torch.sqrt(1 - a) * x / (a * data_var + (1 - a))
        return torch.cat([eps, 0.3 * torch.tanh(x)], dim=1)
    return model


# ---------------------------------------------------------------------------------------
# Schedule and respacing

@pytest.mark.parametrize("spacing", ["", "100"])
def test_tables_match_reference(ref, spacing):
    d = GaussianDiffusion(spacing)
    for name, expected in ref["tables"][spacing].items():
        torch.testing.assert_close(getattr(d, name), expected, rtol=1e-6, atol=0, msg=name)
    assert d.num_timesteps == len(ref["tables"][spacing]["betas"])


def test_cosine_betas_follow_alpha_bar():
    betas = cosine_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[-1].item() == 0.999  # clipped
    ab = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = torch.cumprod(1 - betas, 0)
    expect = torch.tensor([ab((i + 1) / 1000) / ab(0) for i in range(999)], dtype=torch.float64)
    torch.testing.assert_close(ac[:999], expect, rtol=1e-9, atol=1e-12)
    assert bool((betas[1:] >= betas[:-1]).all())


def test_space_timesteps_match_reference(ref):
    for spacing, kept in ref["spacings"].items():
        assert space_timesteps(1000, spacing) == kept, spacing
    assert space_timesteps(1000, 100) == ref["spacings"]["100"]
    assert space_timesteps(1000, [10, 20, 30]) == ref["spacings"]["10,20,30"]
    assert space_timesteps(1000, "") == list(range(1000))


def test_space_timesteps_errors(ref):
    for spacing in ref["spacing_errors"]:  # the ones the reference rejects
        with pytest.raises(ValueError, match="spacing"):
            space_timesteps(1000, spacing)
    for spacing in ["abc", "0", "ddimx"]:
        with pytest.raises(ValueError, match="spacing"):
            space_timesteps(1000, spacing)


def test_respaced_process_keeps_alpha_bar():
    full, spaced = GaussianDiffusion(""), GaussianDiffusion("ddim50")
    torch.testing.assert_close(spaced.alphas_cumprod, full.alphas_cumprod[spaced.timestep_map])
    assert spaced.timestep_map.tolist() == list(range(0, 1000, 20))


def test_tables_stay_out_of_state_dict_and_survive_moves():
    fresh = GaussianDiffusion("100")
    parent = torch.nn.Module()
    with torch.device("meta"):
        parent.d = GaussianDiffusion("100")
    assert parent.state_dict() == {}
    parent.to_empty(device="cpu")  # tables rebuilt, not left uninitialised
    parent.to(torch.bfloat16)  # tables stay float32
    for name, buf in fresh.named_buffers():
        assert getattr(parent.d, name).dtype == buf.dtype, name
        assert torch.equal(getattr(parent.d, name), buf), name


# ---------------------------------------------------------------------------------------
# Forward process and training losses

def test_q_sample_matches_reference(ref):
    tr = ref["train"]
    x_t = GaussianDiffusion("").q_sample(tr["x_start"], tr["t"], tr["noise"])
    torch.testing.assert_close(x_t, tr["x_t"], rtol=1e-6, atol=1e-6)


def test_training_losses_match_reference(ref, ref_diffloss):
    tr = ref["train"]
    net = ref_diffloss.net
    net.zero_grad()
    terms = ref_diffloss.train_diffusion.training_losses(lambda x, ts: net(x, ts, tr["z"]), tr["x_start"], tr["t"],
                                                         tr["noise"])
    assert set(terms) == {"mse", "vb", "loss"}
    for name in ("mse", "vb", "loss"):
        torch.testing.assert_close(terms[name], tr[name], rtol=2e-5, atol=1e-5, msg=name)
    terms["loss"].mean().backward()
    params = dict(net.named_parameters())
    for name, grad in tr["grads"].items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
    net.zero_grad()


def test_vb_term_trains_only_the_variance_channels():
    d = GaussianDiffusion("")
    n, c = 6, 4
    out = torch.randn(n, 2 * c, requires_grad=True)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    terms = d.training_losses(lambda x, ts: out, torch.randn(n, c), t)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.count_nonzero(g_vb[:, :c]) == 0 and torch.count_nonzero(g_vb[:, c:]) > 0
    assert torch.count_nonzero(g_mse[:, c:]) == 0 and torch.count_nonzero(g_mse[:, :c]) > 0


def test_training_losses_bad_inputs():
    d = GaussianDiffusion("")
    model = lambda x, ts: torch.zeros(x.shape[0], 2 * x.shape[1])  # noqa: E731
    with pytest.raises(ValueError, match="t: expected an int64 tensor of shape"):
        d.training_losses(model, torch.randn(3, 4), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="t: expected"):
        d.training_losses(model, torch.randn(3, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x_start"):
        d.training_losses(model, torch.randn(3, 4, 1), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(torch.randn(3, 4), torch.tensor([1, 2, 3]), torch.randn(3, 5))
    with pytest.raises(ValueError, match="model"):
        d.training_losses(lambda x, ts: torch.zeros(3, 4), torch.randn(3, 4), torch.tensor([1, 2, 3]))


# ---------------------------------------------------------------------------------------
# Sampling loop

def test_p_sample_loop_matches_reference(ref, ref_diffloss):
    lp = ref["loop"]
    net = ref_diffloss.net
    x0 = ref_diffloss.gen_diffusion.p_sample_loop(lambda x, ts: net(x, ts, lp["z"]), lp["noise"], lp["temperature"],
                                                  step_noise=lp["step_noise"])
    # random weights make a poor denoiser: the values grow large, compare relative to scale
    scale = lp["out"].abs().max()
    torch.testing.assert_close(x0 / scale, lp["out"] / scale, rtol=0, atol=1e-5)


def test_p_sample_loop_exact_denoiser_matches_reference(ref):
    lg = ref["loop_gauss"]
    d = GaussianDiffusion("100")
    model = _gauss_model(GaussianDiffusion("").alphas_cumprod, lg["data_var"])
    x0 = d.p_sample_loop(model, lg["noise"], lg["temperature"], step_noise=lg["step_noise"])
    torch.testing.assert_close(x0, lg["out"], rtol=1e-5, atol=1e-5)


def test_p_sample_loop_generator_and_temperature():
    d = GaussianDiffusion("25")
    model = _gauss_model(GaussianDiffusion("").alphas_cumprod, 0.25)
    x_T = torch.randn(5, 3)
    a = d.p_sample_loop(model, x_T, generator=torch.Generator().manual_seed(3))
    b = d.p_sample_loop(model, x_T, generator=torch.Generator().manual_seed(3))
    steps = torch.randn((25, 5, 3), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a, d.p_sample_loop(model, x_T, step_noise=steps))
    # temperature 0: the step noise no longer matters
    cold = d.p_sample_loop(model, x_T, temperature=0.0, step_noise=steps)
    assert torch.equal(cold, d.p_sample_loop(model, x_T, temperature=0.0, step_noise=torch.randn_like(steps)))
    assert not torch.equal(cold, a)


def test_p_sample_loop_bad_inputs():
    d = GaussianDiffusion("10")
    model = lambda x, ts: torch.zeros(x.shape[0], 2 * x.shape[1])  # noqa: E731
    with pytest.raises(ValueError, match="step_noise: expected shape"):
        d.p_sample_loop(model, torch.randn(4, 3), step_noise=torch.randn(9, 4, 3))
    with pytest.raises(ValueError, match="noise: expected"):
        d.p_sample_loop(model, torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match="model_output"):
        d.p_sample_loop(lambda x, ts: torch.zeros(4, 5), torch.randn(4, 3))
