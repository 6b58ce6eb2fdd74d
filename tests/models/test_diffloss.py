"""DiffLoss head: checkpoint layout, initialisation, denoiser forward (+ CFG), loss and sampling
against the reference implementation (tests/fixtures/diffloss_ref.pt, see the README there)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tatitok_fast.models.generators.diffloss import DiffLoss, ResBlock, SimpleMLPAdaLN
from tatitok_fast.models.nn.layers import use_linear_factory

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURES / "diffloss_ref.pt", weights_only=False)


def _model(ref, device="cpu") -> DiffLoss:
    c = ref["config"]
    m = DiffLoss(c["token_size"], c["width"], c["depth"], c["z_channels"])
    m.load_state_dict(ref["weights"])
    return m.to(device)


def _rel_close(actual, expected, atol=1e-5):
    """Compare relative to the largest magnitude (the sampled values of a random-weight
    denoiser grow large)."""
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual.cpu() / scale, expected / scale, rtol=0, atol=atol)


# ---------------------------------------------------------------------------------------
# Checkpoint layout and init

@pytest.mark.parametrize("preset", ["maskgen_kl_l", "maskgen_kl_xl"])
def test_state_dict_layout_matches_official(preset):
    layout = json.loads((FIXTURES / "official_layout.json").read_text())[preset]
    cfg = layout["config"]
    expected = {k: v for k, v in layout["state_dict"].items() if k.startswith("diffloss.")}
    with torch.device("meta"):
        parent = nn.Module()
        parent.diffloss = DiffLoss(cfg["model"]["vq_model"]["token_size"], cfg["losses"]["diffloss_w"],
                                   cfg["losses"]["diffloss_d"], cfg["model"]["maskgen"]["decoder_embed_dim"])
    got = {k: list(v.shape) for k, v in parent.state_dict().items()}
    assert got == expected
    assert list(got) == list(expected)  # same order too


def test_initialize_weights_matches_reference(ref):
    c = ref["config"]
    torch.manual_seed(ref["init_seed"])
    m = DiffLoss(c["token_size"], c["width"], c["depth"], c["z_channels"])
    for name, expected in ref["init_weights"].items():
        assert torch.equal(m.state_dict()[name], expected), name
    net = m.net
    assert torch.count_nonzero(net.final_layer.linear.weight) == 0
    assert all(torch.count_nonzero(b.adaLN_modulation[1].weight) == 0 for b in net.res_blocks)
    # zero-initialised output: the untrained net predicts epsilon = 0 and v = 0
    assert torch.count_nonzero(net(torch.randn(3, c["token_size"]), torch.tensor([1, 2, 3]),
                                   torch.randn(3, c["z_channels"]))) == 0


def test_projections_come_from_the_linear_factory():
    made = []

    def factory(i, o, bias=True):
        made.append((i, o))
        return nn.Linear(i, o, bias=bias)

    with use_linear_factory(factory):
        m = DiffLoss(16, 32, 3, 24)
    n_linear = sum(isinstance(x, nn.Linear) for x in m.modules())
    assert len(made) == n_linear == 2 + 2 + 3 * 3 + 2  # time MLP, cond/input, 3 per block, final


# ---------------------------------------------------------------------------------------
# Denoiser forward

@pytest.mark.parametrize("device", DEVICES)
def test_net_forward_and_cfg_match_reference(ref, device):
    net = _model(ref, device).net
    r = ref["net"]
    x, t, c = (r[k].to(device) for k in ("x", "t", "c"))
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, c).cpu(), r["out"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net.forward_with_cfg(x, t, c, r["cfg_scale"]).cpu(), r["out_cfg"],
                                   rtol=1e-5, atol=1e-5)


def _resblock_naive(block: ResBlock, x, y):
    """LayerNorm with affine, modulate, MLP, gated residual: the plain formula."""
    shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
    h = F.layer_norm(x, (x.shape[-1],), block.in_ln.weight, block.in_ln.bias, block.in_ln.eps)
    return x + gate * block.mlp(h * (1 + scale) + shift)


def test_resblock_folded_affine_matches_plain_formula_with_grads():
    block = ResBlock(40)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        block.in_ln.weight.add_(1.0)  # a LayerNorm affine away from the identity
    x = torch.randn(7, 40, requires_grad=True)
    y = torch.randn(7, 40, requires_grad=True)
    out = block(x, F.silu(y))
    ref_out = _resblock_naive(block, x, y)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    leaves = [x, y, *block.parameters()]
    grads = torch.autograd.grad(out, leaves, dout)
    grads_ref = torch.autograd.grad(ref_out, leaves, dout)
    for g, gr in zip(grads, grads_ref):
        torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


def test_forward_embedded_broadcasts_one_timestep_row(ref):
    net = _model(ref).net
    r = ref["net"]
    t = torch.full((8,), 321)
    with torch.no_grad():
        full = net(r["x"], t, r["c"])
        one = net.forward_embedded(r["x"], net.time_embed(t[:1]), net.cond_embed(r["c"]))
    torch.testing.assert_close(one, full, rtol=1e-5, atol=1e-6)


def test_parity_case_maskgen_kl_s_diffloss_net():
    """The DiffLoss part of the MaskGen-KL parity case: load its `diffloss.*` weights (official
    layout) and run the net on the case's decoder output."""
    from tests.helpers import synthetic_weight

    case_dir = FIXTURES / "parity" / "maskgen_kl_s"
    cfg = json.loads((case_dir / "config.json").read_text())
    case = torch.load(case_dir / "case.pt", weights_only=False)
    m = DiffLoss(cfg["model"]["vq_model"]["token_size"], cfg["losses"]["diffloss_w"], cfg["losses"]["diffloss_d"],
                 cfg["model"]["maskgen"]["decoder_embed_dim"])
    prefix = "diffloss."
    sd = {k[len(prefix):]: synthetic_weight(k, shape, case["seed"], case["kinds"][k])
          for k, shape in case["shapes"].items() if k.startswith(prefix)}
    m.load_state_dict(sd, strict=True)
    z = case["outputs"]["z"]
    with torch.no_grad():
        out = m.net(case["inputs"]["x_t"], case["inputs"]["t"], z.reshape(-1, z.shape[-1]))
    torch.testing.assert_close(out, case["outputs"]["diffloss_net"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Training loss

def test_forward_with_given_t_and_noise_matches_reference(ref):
    m = _model(ref)
    f = ref["forward"]
    loss, logs = m(f["target"], f["z"], f["mask"], t=f["t"], noise=f["noise"])
    torch.testing.assert_close(loss, f["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logs["diff_loss"], f["diff_loss"], rtol=1e-5, atol=1e-6)
    assert not logs["diff_loss"].requires_grad and loss.requires_grad
    loss, _ = m(f["target"], f["z"], t=f["t_nomask"], noise=f["noise_nomask"])
    torch.testing.assert_close(loss, f["loss_nomask"], rtol=1e-5, atol=1e-6)


def test_forward_draws_timesteps_then_noise_as_reference(ref):
    # on the CPU, randint then randn from one seed is the reference's stream
    m = _model(ref)
    f = ref["forward"]
    loss, _ = m(f["target"], f["z"], f["mask"], generator=torch.Generator().manual_seed(f["seed"]))
    torch.testing.assert_close(loss, f["loss"], rtol=1e-5, atol=1e-6)
    loss, _ = m(f["target"], f["z"], generator=torch.Generator().manual_seed(f["seed_nomask"]))
    torch.testing.assert_close(loss, f["loss_nomask"], rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_gives_same_loss_and_grads(ref):
    m = _model(ref)
    f = ref["forward"]
    grads = []
    for enable in (False, True):
        m.set_grad_checkpointing(enable)
        m.zero_grad()
        loss, _ = m(f["target"], f["z"], f["mask"], t=f["t"], noise=f["noise"])
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    m.set_grad_checkpointing(False)
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Sampling

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg_as_tensor", [False, True])
def test_sample_with_cfg_matches_reference(ref, device, cfg_as_tensor):
    m = _model(ref, device)
    s = ref["sample_cfg"]
    cfg = torch.tensor([s["cfg"]], device=device) if cfg_as_tensor else s["cfg"]
    out = m.sample(s["z"].to(device), s["temperature"], cfg, noise=s["noise"].to(device),
                   step_noise=s["step_noise"].to(device))
    assert out.shape == s["out"].shape
    _rel_close(out, s["out"])


def test_sample_draws_like_reference_from_a_seed(ref):
    # on the CPU, the initial noise then all step noise from one seed is the reference's stream
    m = _model(ref)
    for key, cfg in (("sample_cfg", ref["sample_cfg"]["cfg"]), ("sample", 1.0)):
        s = ref[key]
        out = m.sample(s["z"], s["temperature"], cfg, generator=torch.Generator().manual_seed(s["seed"]))
        _rel_close(out, s["out"])


def test_sample_guided_halves_share_noise_and_epsilon(ref):
    m = _model(ref)
    s = ref["sample_cfg"]
    # one shared start and one guided epsilon for both halves: they differ only through their
    # variance channels and step noise, which temperature 0 removes
    out = m.sample(s["z"], 0.0, s["cfg"], noise=s["noise"], step_noise=s["step_noise"])
    assert torch.equal(out[:3], out[3:])
    hot = m.sample(s["z"], 1.0, s["cfg"], noise=s["noise"], step_noise=s["step_noise"])
    assert not torch.equal(hot[:3], hot[3:])


# ---------------------------------------------------------------------------------------
# Bad inputs

def test_bad_inputs():
    m = DiffLoss(4, 8, 1, 6)
    with pytest.raises(ValueError, match=r"target: expected a tensor of shape \(N, 4\)"):
        m(torch.randn(3, 5), torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"z: expected a tensor of shape \(3, 6\)"):
        m(torch.randn(3, 4), torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"mask: expected a tensor of shape \(3,\)"):
        m(torch.randn(3, 4), torch.randn(3, 6), torch.ones(3, 1))
    with pytest.raises(ValueError, match="noise"):
        m(torch.randn(3, 4), torch.randn(3, 6), noise=torch.randn(3, 5))
    with pytest.raises(ValueError, match="t: expected"):
        m(torch.randn(3, 4), torch.randn(3, 6), t=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="z: expected an even number of rows"):
        m.sample(torch.randn(3, 6), cfg=2.0)
    with pytest.raises(ValueError, match=r"noise: expected a tensor of shape \(2, 4\)"):
        m.sample(torch.randn(4, 6), cfg=2.0, noise=torch.randn(4, 4))
    with pytest.raises(ValueError, match="step_noise"):
        m.sample(torch.randn(4, 6), step_noise=torch.randn(99, 4, 4))
    with pytest.raises(ValueError, match="cfg"):
        m.sample(torch.randn(4, 6), cfg=torch.tensor([1.5, 2.0]))
    with pytest.raises(ValueError, match="z: expected"):
        m.sample(torch.randn(4, 7))
    for kwargs, name in ((dict(token_size=0), "token_size"), (dict(width=-1), "width"), (dict(depth=-2), "depth")):
        args = dict(token_size=4, width=8, depth=1, z_channels=6) | kwargs
        with pytest.raises(ValueError, match=name):
            DiffLoss(**args)
    with pytest.raises(ValueError, match="spacing"):
        DiffLoss(4, 8, 1, 6, num_sampling_steps="ddim999")


# ---------------------------------------------------------------------------------------
# CUDA graphs (GPU only): the sampler captures (no host sync) and replays exactly

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_captures_in_a_cuda_graph(ref):
    m = _model(ref, "cuda")
    s = ref["sample_cfg"]
    z, noise, steps = (s[k].cuda() for k in ("z", "noise", "step_noise"))
    cfg = torch.tensor([s["cfg"]], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = m.sample(z, s["temperature"], cfg, noise=noise, step_noise=steps)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = m.sample(z, s["temperature"], cfg, noise=noise, step_noise=steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager)
