"""tatitok_fast: TA-TiTok and TiTok tokenizers, the MaskGIT-VQGAN, and MaskGen generators,
loading the official checkpoints unchanged, on fused C++/CUDA/Triton kernels.

    from tatitok_fast import TATiTok, TiTok, MaskGITVQGAN, MaskGen_VQ, MaskGen_KL
    from tatitok_fast.text import CLIPTextEncoder
    model = tatitok_fast.compile(model)   # inference through torch.compile, same results
"""
from tatitok_fast.models.generators.maskgen import MaskGen_KL, MaskGen_VQ
from tatitok_fast.models.generators.maskgit import ImageBert, UViTBert
from tatitok_fast.models.tokenizers.tatitok import TATiTok
from tatitok_fast.models.tokenizers.titok import TiTok
from tatitok_fast.models.tokenizers.vqgan import MaskGITVQGAN, PretrainedTokenizer
from tatitok_fast.pipeline import ClassToImage, TextToImage, check_compatible
from tatitok_fast.compile import compile  # noqa: A004 - tatitok_fast.compile(model), as torch.compile

__all__ = ["TATiTok", "TiTok", "MaskGITVQGAN", "PretrainedTokenizer", "MaskGen_VQ", "MaskGen_KL", "ImageBert", "UViTBert", "TextToImage",
           "ClassToImage", "check_compatible", "compile"]
__version__ = "0.1.0"
