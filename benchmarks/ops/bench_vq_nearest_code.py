"""Benchmark: fused nearest-code search vs the distance matrix + argmin of the reference quantizer.

    python benchmarks/ops/bench_vq_nearest_code.py [--device cpu|cuda|all] [--quick] [--json PATH] [--markdown PATH]

The cases, timing and table are those of `tatitok-fast bench ops --ops vq_nearest_code`
(tatitok_fast/benchmarks/ops.py); this script only picks the op.
"""
import sys

from tatitok_fast.benchmarks.ops import script_main

if __name__ == "__main__":
    sys.exit(script_main(["vq_nearest_code"]))
