"""Triton kernels (one file each, beside its PyTorch twin) for the adaLN blocks of MM-DiT and
DiffLoss."""
from tatitok_fast.ops.triton.gated_residual import gated_residual, gated_residual_ref
from tatitok_fast.ops.triton.layernorm_modulate import layernorm_modulate, layernorm_modulate_ref

__all__ = ["gated_residual", "gated_residual_ref", "layernorm_modulate", "layernorm_modulate_ref"]
