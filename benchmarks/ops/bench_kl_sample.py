"""Benchmark: one-pass diagonal-Gaussian sample + KL vs the reference DiagonalGaussianDistribution.

    python benchmarks/ops/bench_kl_sample.py [--device cpu|cuda|all] [--quick] [--json PATH] [--markdown PATH]

The cases, timing and table are those of `tatitok-fast bench ops --ops kl_sample`
(tatitok_fast/benchmarks/ops.py); this script only picks the op.
"""
import sys

from tatitok_fast.benchmarks.ops import script_main

if __name__ == "__main__":
    sys.exit(script_main(["kl_sample"]))
