"""Benchmark: Triton adaLN kernels (layernorm_modulate, gated_residual) vs their PyTorch twins; CUDA only.

    python benchmarks/ops/bench_adaln.py [--device cpu|cuda|all] [--quick] [--json PATH] [--markdown PATH]

The cases, timing and table are those of `tatitok-fast bench ops --ops layernorm_modulate,gated_residual`
(tatitok_fast/benchmarks/ops.py); this script only picks the op.
"""
import sys

from tatitok_fast.benchmarks.ops import script_main

if __name__ == "__main__":
    sys.exit(script_main(["layernorm_modulate", "gated_residual"]))
