"""The generators' CUDA-graph cache key carries the ops mode (fused kernels vs
reference_mode()): on CPU, with a stand-in capture (the loop run eagerly on the static
inputs) in place of CUDA's, a loop captured in one mode is not replayed in the other and
each mode's result is its own eager result. On CUDA: capture and replay on the model's
device, whichever device is current (two GPUs), and a loop captured while a user stream is
current."""
import pytest
import torch

from tatitok_fast.models.generators import graph_runner
from tatitok_fast.models.generators.graph_runner import _GraphRunner, graph_key
from tatitok_fast.ops import reference_mode
from tests.helpers import HAS_CUDA, tiny_generator_config, tiny_text_encoder
from tatitok_fast.models.generators.graph_runner import CapturedLoop


class StandInCapture:
    """Capture without CUDA, RNG-neutral like capture_cuda_graph: the capture run's random
    draws are undone, replay() runs fn on the static inputs into the static output."""

    def __init__(self):
        self.captured = []

    def __call__(self, fn, static_in):
        rng = torch.get_rng_state()
        out = fn(*static_in)
        torch.set_rng_state(rng)
        self.captured.append(len(self.captured))
        return CapturedLoop(lambda: out.copy_(fn(*static_in)), out, lambda: None)


def test_graph_key_names_the_ops_mode():
    fused = graph_key("vq", 2, (1, 2), torch.float32)
    with reference_mode():
        ref = graph_key("vq", 2, (1, 2), torch.float32)
        with reference_mode(False):
            assert graph_key("vq", 2, (1, 2), torch.float32) == fused
    assert fused != ref
    assert fused[:-1] == ref[:-1] == ("vq", 2, (1, 2), torch.float32)


@pytest.mark.parametrize("mode", ["vq", "vae", "maskgit"])
def test_generators_capture_once_per_ops_mode(monkeypatch, mode):
    """generate() with the graph path forced on CPU (stand-in capture): fused, then
    reference_mode, then fused again -> two captures, and each answer equals that mode's
    eager answer."""
    from tatitok_fast.models.generators import maskgen_kl, maskgen_vq, maskgit

    module = {"vq": maskgen_vq, "vae": maskgen_kl, "maskgit": maskgit}[mode]
    monkeypatch.setattr(module, "_use_graph", lambda use_cuda_graph, device, generator: bool(use_cuda_graph))
    torch.manual_seed(0)
    if mode == "maskgit":
        from tatitok_fast.models.generators.maskgit import ImageBert
        from tests.models.test_maskgit import small_config

        model = ImageBert(small_config()).eval()

        def run(graph):
            torch.manual_seed(7)
            return model.generate(torch.tensor([1, 2]), num_sample_steps=3, noise="philox", use_cuda_graph=graph)
    elif mode == "vq":
        from tatitok_fast.models.generators.maskgen import MaskGen_VQ

        model = MaskGen_VQ(tiny_generator_config("vq")).eval()
        enc = tiny_text_encoder()

        def run(graph):
            torch.manual_seed(7)
            return model.generate(["a cat", "a dog"], text_encoder=enc, num_sample_steps=3, noise="philox",
                                  use_cuda_graph=graph)
    elif mode == "vae":
        from tatitok_fast.models.generators.maskgen import MaskGen_KL

        model = MaskGen_KL(tiny_generator_config("vae")).eval()
        enc = tiny_text_encoder()

        def run(graph):
            torch.manual_seed(7)
            return model.sample_tokens(2, num_iter=2, captions=["a cat", "a dog"], text_encoder=enc,
                                       use_cuda_graph=graph)
    model._graphs = _GraphRunner(capture=StandInCapture())
    cap = model._graphs.capture
    with torch.no_grad():
        fused = run(True)
        with reference_mode():
            ref = run(True)
            ref_eager = run(False)
        again = run(True)
        fused_eager = run(False)
    assert len(cap.captured) == 2, "one capture per ops mode"
    assert sorted(k[-1] for k in model._graphs.graphs) == ["fused", "reference"]
    torch.testing.assert_close(fused, fused_eager)
    torch.testing.assert_close(again, fused_eager)
    torch.testing.assert_close(ref, ref_eager)


# ---------------------------------------------------------------------------------------
# Real CUDA graphs on the model's device

def _capture_matches_eager(device: torch.device) -> None:
    lin = torch.nn.Linear(16, 16).to(device)

    def fn(x):
        return lin(x) + torch.rand(x.shape, device=x.device)  # an RNG draw: the capture registers the generator

    x = torch.randn(4, 16, device=device)
    torch.cuda.manual_seed_all(3)
    with torch.no_grad():
        loop = graph_runner.capture_cuda_graph(fn, [x])
        loop.replay()
        got = loop.static_out.clone()
        torch.cuda.manual_seed_all(3)
        want = fn(x)
    torch.testing.assert_close(got, want)
    loop.release()


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_capture_under_a_user_stream():
    dev = torch.device("cuda", torch.cuda.current_device())
    with torch.cuda.stream(torch.cuda.Stream(dev)):
        _capture_matches_eager(dev)


@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_capture_on_the_model_device_not_the_current_one():
    with torch.cuda.device(0):
        _capture_matches_eager(torch.device("cuda", 1))
