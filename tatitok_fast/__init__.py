"""tatitok_fast: TA-TiTok tokenizers and MaskGen generators, loading the official checkpoints
unchanged, on fused C++/CUDA/Triton kernels.

    from tatitok_fast import TATiTok, MaskGen_VQ, MaskGen_KL
    from tatitok_fast.text import CLIPTextEncoder
"""
from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ
from tatitok_fast.models.generators.maskgit import ImageBert, UViTBert
from tatitok_fast.models.tokenizers.tatitok import TATiTok
from tatitok_fast.pipeline import TextToImage, check_compatible

__all__ = ["TATiTok", "MaskGen_VQ", "MaskGen_KL", "ImageBert", "UViTBert", "TextToImage", "check_compatible"]
__version__ = "0.1.0"
