"""The generators' CUDA-graph cache: invalidation when the model's parameters or buffers
change, LRU eviction that releases graphs, input copy-in and output copy-out. On CPU the
cache's bookkeeping runs with a stand-in capture (it calls the loop on the static inputs);
on CUDA real graphs are checked against the eager loop, seed for seed."""
import copy

import pytest
import torch
import torch.nn as nn

from tatitok_fast.models.generators.graph_runner import CapturedLoop, _GraphRunner, parameter_fingerprint
from tests.helpers import HAS_CUDA, tiny_generator_config, tiny_text_encoder


class StandInCapture:
    """Capture without CUDA: replay() recomputes fn on the static inputs into the static
    output; counts captures and releases."""

    def __init__(self):
        self.captured, self.released = [], []

    def __call__(self, fn, static_in):
        out = fn(*static_in)
        tag = len(self.captured)
        self.captured.append(tag)
        return CapturedLoop(lambda: out.copy_(fn(*static_in)), out, lambda: self.released.append(tag))


def _runner(max_graphs=4):
    cap = StandInCapture()
    return _GraphRunner(max_graphs, capture=cap), cap


def test_replays_on_new_inputs_and_returns_a_copy():
    runner, cap = _runner()
    lin = nn.Linear(3, 2)
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    with torch.no_grad():
        a = runner("k", lin, [x1], module=lin)
        b = runner("k", lin, [x2], module=lin)
        torch.testing.assert_close(a, lin(x1))
        torch.testing.assert_close(b, lin(x2))
    assert cap.captured == [0], "one capture per key"
    static_out = runner.graphs["k"][0].static_out
    assert b.data_ptr() != static_out.data_ptr(), "results must not alias the replayed buffer"


@pytest.mark.parametrize("change", ["half", "double_then_float", "load_state_dict", "inplace", "new_parameter",
                                    "buffer"])
def test_parameter_changes_drop_every_graph(change):
    runner, cap = _runner()
    lin = nn.Linear(3, 2)
    lin.register_buffer("table", torch.zeros(2))
    with torch.no_grad():
        runner("a", lin, [torch.randn(1, 3)], module=lin)
        runner("b", lin, [torch.randn(2, 3)], module=lin)
        before = parameter_fingerprint(lin)
        if change == "half":
            lin.half()
        elif change == "double_then_float":  # new storage, same dtype as before
            lin.double().float()
        elif change == "load_state_dict":
            lin.load_state_dict({k: torch.randn_like(v) for k, v in lin.state_dict().items()})
        elif change == "inplace":
            lin.weight.mul_(2)
        elif change == "new_parameter":
            lin.bias = nn.Parameter(torch.zeros(2))
        else:
            lin.table.add_(1)
    assert parameter_fingerprint(lin) != before
    x = torch.randn(1, 3, dtype=lin.weight.dtype)
    with torch.no_grad():
        out = runner("a", lin, [x], module=lin)
        torch.testing.assert_close(out, lin(x))
    assert sorted(cap.released) == [0, 1], "both old graphs released"
    assert list(runner.graphs) == ["a"] and cap.captured == [0, 1, 2]


def test_unchanged_module_keeps_its_graphs():
    runner, cap = _runner()
    lin = nn.Linear(3, 2).eval()
    with torch.no_grad():
        for _ in range(3):
            runner("a", lin, [torch.randn(1, 3)], module=lin)
        lin.to(torch.float32)  # a no-op cast keeps storage and versions
        lin(torch.randn(1, 3))  # a forward pass changes nothing
        runner("a", lin, [torch.randn(1, 3)], module=lin)
    assert cap.captured == [0] and cap.released == []


def test_lru_eviction_releases_the_least_recently_used():
    runner, cap = _runner(max_graphs=2)
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        for key, n in (("b1", 1), ("b2", 2), ("b1", 1), ("b3", 3)):  # b1 used again: b2 is the oldest
            runner(key, lin, [torch.randn(n, 3)], module=lin)
    assert list(runner.graphs) == ["b1", "b3"]
    assert cap.released == [1], "the b2 graph (second capture) was released"
    runner.clear()
    assert not runner.graphs and sorted(cap.released) == [0, 1, 2]


def test_copies_start_empty_and_bad_size():
    runner, _ = _runner()
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        runner("a", lin, [torch.randn(1, 3)], module=lin)
    assert not copy.deepcopy(runner).graphs and runner.graphs
    with pytest.raises(ValueError, match="max_graphs: expected an int >= 1"):
        _GraphRunner(0)


def test_generator_model_copy_has_an_empty_cache():
    from tatitok_fast.models.generators.maskgen import MaskGen_VQ

    model = MaskGen_VQ(tiny_generator_config("vq"))
    model._graphs.graphs["stale"] = None  # what a capture would leave
    assert not copy.deepcopy(model)._graphs.graphs


# ---------------------------------------------------------------------------------------
# Real CUDA graphs

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")


@cuda_only
@pytest.mark.parametrize("mode", ["vq", "vae"])
def test_cuda_graph_same_answer_as_eager_for_one_seed(mode):
    from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ

    torch.manual_seed(0)
    model = (MaskGen_VQ if mode == "vq" else MaskGen_KL)(tiny_generator_config(mode)).cuda().eval()
    enc = tiny_text_encoder().to("cuda")
    caps = ["a cat", "a dog"]

    def run(**kw):
        torch.manual_seed(7)
        if mode == "vq":
            return model.generate(caps, text_encoder=enc, num_sample_steps=5, **kw)
        return model.sample_tokens(2, num_iter=4, captions=caps, text_encoder=enc, **kw)

    eager = run(use_cuda_graph=False)
    first = run()  # captures: the warm-up run must not shift the random stream
    replay = run()
    assert len(model._graphs.graphs) == 1
    torch.testing.assert_close(first, eager)
    torch.testing.assert_close(replay, eager)
    # new weights: the cache is dropped and the graph follows them
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.testing.assert_close(run(), run(use_cuda_graph=False))
    model.to(torch.bfloat16)
    assert run().shape == eager.shape and len(model._graphs.graphs) == 1
