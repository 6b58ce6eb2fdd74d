"""The FID / Inception Score network: torch-fidelity's InceptionV3 feature extractor with the
standard TF-ported weights (pt_inception-2015-12-05, the weights the official evaluator and
pytorch-fid use; torch-fidelity names its copy weights-inception-2015-12-05-6726825d.pth).

    feats = InceptionFeatures(device="cuda")        # weights: path, $TATITOK_FAST_INCEPTION_WEIGHTS,
    pool, logits = feats(images)                    # torch hub cache, or a download
    # images (B, 3, H, W) in [0, 1] -> pool (B, 2048), logits_unbiased (B, 1008)

weights="random": fixed-seed random weights and 75x75 inputs (the smallest InceptionV3 takes,
~16x cheaper than 299): smoke tests only, the numbers mean nothing.
"""
from __future__ import annotations

import io

import torch
import torch.nn as nn

from tatitok_fast.weight_files import WeightsFile, resolve_weights_file

INCEPTION_FILE = WeightsFile(
    "InceptionV3 FID weights (pt_inception-2015-12-05)", "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "TATITOK_FAST_INCEPTION_WEIGHTS", "--inception-weights",
    extra_locations=("{hub}/checkpoints/pt_inception-2015-12-05-6726825d.pth",))  # pytorch-fid's name
POOL_DIM, NUM_CLASSES = 2048, 1008
# sFID (ADM's evaluator): the first 7 channels of `mixed_6/conv` of the TF graph, the 1x1 branch
# of the 4th 17x17 block (Mixed_6d.branch1x1 here), flattened in NHWC order: 17 * 17 * 7 = 2023
SPATIAL_MODULE, SPATIAL_CHANNELS = "Mixed_6d.branch1x1", 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # at the 299 input of the real weights
RANDOM_SEED = 0
RANDOM_INPUT_SIZE = 75  # weights="random" only


def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Extractor(FeatureExtractorInceptionV3):
        """torch-fidelity's network; an empty state dict (weights="random") is not loaded."""

        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Extractor


class InceptionFeatures(nn.Module):
    """Frozen InceptionV3: images (B, 3, H, W) in [0, 1] -> (pool (B, 2048), logits (B, 1008)).
    Images are rounded to uint8 levels first (the network's input format) and resized to 299
    inside torch-fidelity (TF1-compatible bilinear)."""

    def __init__(self, weights: str | None = None, *, device: torch.device | str = "cpu", download: bool = True):
        super().__init__()
        try:
            import torch_fidelity  # noqa: F401
        except ImportError:
            raise ImportError("FID / Inception Score need torch-fidelity: pip install 'tatitok_fast[eval]'") from None
        if weights == "random":
            source, self.weights = io.BytesIO(), "random"
            torch.save({}, source)
            source.seek(0)
        else:
            path = resolve_weights_file(INCEPTION_FILE, weights, download)
            source, self.weights = str(path), str(path)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            try:
                self.net = _extractor_class()("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=source)
            except RuntimeError as exc:  # wrong keys / shapes
                raise ValueError(f"--inception-weights {weights}: not InceptionV3 FID weights ({exc})") from None
            if weights == "random":  # He init keeps activations O(1) through the ~90 conv layers
                for m in self.net.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                self.net.INPUT_IMAGE_SIZE = RANDOM_INPUT_SIZE
        self.to(device).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.net.fc.weight.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images: expected (B, 3, H, W) in [0, 1], got {got}")
        x = images.to(self.device)
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
        pool, logits = self.net(x)
        return pool.float(), logits.float()

    @torch.no_grad()
    def with_spatial(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pool (B, 2048), logits (B, 1008), spatial (B, SPATIAL_DIM)): forward plus the sFID
        features (see SPATIAL_MODULE)."""
        grabbed = []
        hook = self.net.get_submodule(SPATIAL_MODULE).register_forward_hook(
            lambda _m, _i, out: grabbed.append(out[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()))
        try:
            pool, logits = self(images)
        finally:
            hook.remove()
        return pool, logits, grabbed[0]
