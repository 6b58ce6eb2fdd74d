import pytest
import torch

from tatitok_fast import ops
from tatitok_fast.ops.reference import mask_by_order_ref
from tests.helpers import devices_for, poison_allocator

DEVICES = devices_for("mask_by_order")


def _orders(b, seq_len, device):
    return torch.stack([torch.randperm(seq_len, device=device) for _ in range(b)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("b, seq_len", [(1, 1), (3, 32), (8, 128), (2, 1000)])
@pytest.mark.parametrize("last_step", [False, True])
def test_matches_reference(device, b, seq_len, last_step):
    orders = _orders(b, seq_len, device)
    mask = torch.ones(b, seq_len, device=device)
    for mask_len in sorted({seq_len, seq_len - 1, seq_len // 2, 1, 0}):
        if mask_len < 0:
            continue
        poison_allocator(device)
        got = ops.mask_by_order(orders, mask, mask_len, last_step)
        want = mask_by_order_ref(orders, mask, mask_len, last_step)
        assert got[0].dtype == torch.bool and got[1].dtype == torch.bool
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_full_schedule_reveals_every_position_once(device):
    b, seq_len = 4, 32
    orders = _orders(b, seq_len, device)
    mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
    seen = torch.zeros(b, seq_len, dtype=torch.long, device=device)
    lens = [28, 20, 9, 0]
    for step, mask_len in enumerate(lens):
        mask, to_pred = ops.mask_by_order(orders, mask, mask_len, step == len(lens) - 1)
        seen += to_pred.long()
        assert mask.sum(1).eq(mask_len).all()
    assert seen.eq(1).all()


def test_opcheck():
    orders = _orders(3, 10, "cpu")
    torch.library.opcheck(torch.ops.tatitok_fast.mask_by_order, (orders, torch.ones(3, 10), 4, False))


def test_bad_inputs():
    orders = _orders(2, 6, "cpu")
    with pytest.raises(TypeError, match="orders: expected dtype"):
        ops.mask_by_order(orders.int(), torch.ones(2, 6), 2)
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 6\)"):
        ops.mask_by_order(orders, torch.ones(2, 5), 2)
    with pytest.raises(ValueError, match=r"mask_len: expected an int in \[0, L=6\]"):
        ops.mask_by_order(orders, torch.ones(2, 6), 7)
    with pytest.raises(RuntimeError, match=r"orders\[0, 0\] = 9 is not in \[0, L=6\)"):
        bad = orders.clone()
        bad[0, 0] = 9
        ops.mask_by_order(bad, torch.ones(2, 6), 3)
