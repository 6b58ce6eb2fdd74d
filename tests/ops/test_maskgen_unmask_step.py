import pytest
import torch
from scipy import stats

from tatitok_fast import ops
from tatitok_fast.ops.reference import gumbel_noise, maskgen_unmask_step_ref
from tests.helpers import devices_for, poison_allocator

DEVICES = devices_for("maskgen_unmask_step")


def _state(b, seq_len, k, device, decoded_frac=0.4, dtype=torch.float32):
    logits = (torch.randn(b, seq_len, k, device=device) * 3).to(dtype)
    ids = torch.full((b, seq_len), k, device=device, dtype=torch.long)
    decoded = torch.rand(b, seq_len, device=device) < decoded_frac
    ids[decoded] = torch.randint(0, k, (int(decoded.sum()),), device=device)
    return logits, ids


CASES = [  # (B, L, K, mask_len)
    (1, 1, 1, 0),
    (2, 16, 100, 5),
    (3, 128, 8192, 40),
    (2, 32, 16384, 10),
    (4, 33, 1001, 32),
    (32, 128, 8192, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cfg", [None, 3.5])
@pytest.mark.parametrize("last_step", [False, True])
def test_reproduces_reference_ids_with_explicit_noise(device, case, cfg, last_step):
    b, seq_len, k, mask_len = case
    logits, ids = _state(b, seq_len, k, device)
    uncond = torch.randn_like(logits) if cfg is not None else None
    g = gumbel_noise((b, seq_len, k), device=device)
    g2 = gumbel_noise((b, seq_len), device=device)
    kw = dict(softmax_temperature=0.5 + 0.8 * 0.37, sample_temperature=1.3, confidence_temperature=1.3,
              last_step=last_step, sample_noise=g, confidence_noise=g2, uncond_logits=uncond,
              guidance_scale=cfg or 0.0)
    poison_allocator(device)
    got = ops.maskgen_unmask_step(logits, ids, k, mask_len, **kw)
    want = maskgen_unmask_step_ref(logits, ids, k, mask_len, **kw)
    assert torch.equal(got, want)
    decoded = ids != k
    if last_step or mask_len < (~decoded).sum(1).min():  # the cut-off stays below +inf
        assert torch.equal(got[decoded], ids[decoded]), "decoded ids must be kept"
    if last_step:
        assert not bool((got == k).any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(device, dtype):
    b, seq_len, k = 4, 64, 4096
    logits, ids = _state(b, seq_len, k, device, dtype=dtype)
    g, g2 = gumbel_noise((b, seq_len, k), device=device), gumbel_noise((b, seq_len), device=device)
    kw = dict(softmax_temperature=0.9, sample_temperature=2.0, confidence_temperature=2.0, last_step=False,
              sample_noise=g, confidence_noise=g2)
    got = ops.maskgen_unmask_step(logits, ids, k, 20, **kw)
    # the kernel upcasts to fp32 before any arithmetic: equal to the reference on the upcast logits
    assert torch.equal(got, maskgen_unmask_step_ref(logits.float(), ids, k, 20, **kw))


@pytest.mark.parametrize("device", DEVICES)
def test_per_row_mask_len_and_no_noise_confidence(device):
    b, seq_len, k = 5, 40, 300
    logits, ids = _state(b, seq_len, k, device, decoded_frac=0.0)
    mask_len = torch.tensor([0, 1, 7, 39, 40], device=device)
    g = gumbel_noise((b, seq_len, k), device=device)
    kw = dict(softmax_temperature=1.1, sample_temperature=0.7, confidence_temperature=0.0, last_step=False,
              sample_noise=g, confidence_noise=torch.zeros(b, seq_len, device=device))
    got = ops.maskgen_unmask_step(logits, ids, k, mask_len, **kw)
    assert torch.equal(got, maskgen_unmask_step_ref(logits, ids, k, mask_len, **kw))
    assert (got == k).sum(1).tolist() == mask_len.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_ties_in_confidence_remask_every_tied_position(device):
    # equal logits everywhere and no confidence noise: every masked position ties at the
    # cut-off, and the reference's `confidence <= cut_off` re-masks all of them
    b, seq_len, k = 2, 10, 6
    logits = torch.zeros(b, seq_len, k, device=device)
    ids = torch.full((b, seq_len), k, device=device)
    ids[:, :3] = 1
    got = ops.maskgen_unmask_step(logits, ids, k, 2, softmax_temperature=1.0, sample_temperature=0.0,
                                  confidence_temperature=0.0)
    assert got[:, 3:].eq(k).all() and got[:, :3].eq(1).all()
    # and the argmax of equal scores is the lowest index, as torch.argmax
    got = ops.maskgen_unmask_step(logits, ids, k, 0, softmax_temperature=1.0, sample_temperature=0.0)
    assert got[:, 3:].eq(0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_gumbel_max_samples_the_softmax(device):
    # 4096 masked positions with the same logits: sampled ids follow softmax(logits / T / t)
    k, temp, t = 6, 0.8, 1.5
    row = torch.tensor([0.0, 1.0, -0.5, 2.0, 0.3, 1.2], device=device)
    logits = row.expand(64, 64, k).contiguous()
    ids = torch.full((64, 64), k, device=device)
    torch.manual_seed(0)
    got = ops.maskgen_unmask_step(logits, ids, k, 0, softmax_temperature=temp, sample_temperature=t)
    counts = torch.bincount(got.flatten().cpu(), minlength=k).double()
    expected = torch.softmax(row.cpu().double() / temp / t, 0) * counts.sum()
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    torch.manual_seed(0)
    again = ops.maskgen_unmask_step(logits, ids, k, 0, softmax_temperature=temp, sample_temperature=t)
    assert torch.equal(got, again)


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_confidence_noise_remasks_uniformly(device):
    # one candidate token, so all confidences tie before noise: the Gumbel noise alone
    # decides which mask_len positions are re-masked; each must be equally likely
    b, seq_len, k, mask_len = 4000, 8, 1, 3
    logits = torch.zeros(b, seq_len, k, device=device)
    ids = torch.full((b, seq_len), k, device=device)
    got = ops.maskgen_unmask_step(logits, ids, k, mask_len, softmax_temperature=1.0, sample_temperature=1.0)
    remasked = (got == k)
    assert remasked.sum(1).eq(mask_len).all()
    per_pos = remasked.sum(0).double().cpu()
    assert stats.chisquare(per_pos.numpy()).pvalue > 1e-3


def test_opcheck():
    logits, ids = _state(2, 8, 20, "cpu")
    g, g2 = gumbel_noise((2, 8, 20)), gumbel_noise((2, 8))
    op = torch.ops.tatitok_fast.maskgen_unmask_step
    torch.library.opcheck(op, (logits, None, 0.0, ids, 20, None, 3, 1.0, 1.0, 1.0, False, g, g2, None))
    torch.library.opcheck(op, (logits, torch.randn_like(logits), 2.0, ids, 20, torch.tensor([1, 2]), 0, 0.7, 1.0, 0.0,
                               True, g, g2, None))


def test_bad_inputs():
    logits, ids = _state(2, 8, 20, "cpu")
    call = ops.maskgen_unmask_step
    with pytest.raises(ValueError, match="logits: expected a 3-D tensor"):
        call(logits[0], ids, 20, 1)
    with pytest.raises(ValueError, match=r"ids: expected shape \(2, 8\)"):
        call(logits, ids[:, :4], 20, 1)
    with pytest.raises(TypeError, match="ids: expected dtype"):
        call(logits, ids.int(), 20, 1)
    with pytest.raises(ValueError, match=r"mask_len: expected an int in \[0, L=8\]"):
        call(logits, ids, 20, 9)
    with pytest.raises(ValueError, match=r"mask_len: expected an int in \[0, L=8\]"):
        call(logits, ids, 20, -1)
    with pytest.raises(ValueError, match=r"mask_len: expected shape \(2,\)"):
        call(logits, ids, 20, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="logits: expected .* L, K >= 1"):
        call(logits[:, :, :0], ids, 20, 1)
    with pytest.raises(ValueError, match="softmax_temperature: expected > 0"):
        call(logits, ids, 20, 1, softmax_temperature=0.0)
    with pytest.raises(ValueError, match="uncond_logits: expected shape"):
        call(logits, ids, 20, 1, uncond_logits=logits[:, :4])
    with pytest.raises(ValueError, match="sample_noise: expected shape"):
        call(logits, ids, 20, 1, sample_noise=torch.zeros(2, 8, 3))
    with pytest.raises(ValueError, match="ids: expected a tensor on cpu"):
        call(logits, ids.to("meta"), 20, 1)
    with pytest.raises(RuntimeError, match=r"mask_len_per_row values must be in \[0, L=8\]"):
        call(logits, ids, 20, torch.tensor([1, 9]))
