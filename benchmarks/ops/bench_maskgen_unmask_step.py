"""Benchmark: one fused MaskGen-VQ sampling step vs drawing Gumbel noise + the reference step.

    python benchmarks/ops/bench_maskgen_unmask_step.py [--device cpu|cuda|all] [--quick] [--json PATH] [--markdown PATH]

The cases, timing and table are those of `tatitok-fast bench ops --ops maskgen_unmask_step`
(tatitok_fast/benchmarks/ops.py); this script only picks the op.
"""
import sys

from tatitok_fast.benchmarks.ops import script_main

if __name__ == "__main__":
    sys.exit(script_main(["maskgen_unmask_step"]))
