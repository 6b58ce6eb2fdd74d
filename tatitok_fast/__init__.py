"""tatitok_fast: TA-TiTok tokenizers and MaskGen generators, loading the official checkpoints
unchanged, on fused C++/CUDA/Triton kernels."""
from tatitok_fast.models.tatitok import TATiTok

__all__ = ["TATiTok"]
__version__ = "0.1.0"
