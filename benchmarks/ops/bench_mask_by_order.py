"""Benchmark: MaskGen-KL step masks vs the reference scatter + xor.

    python benchmarks/ops/bench_mask_by_order.py [--device cpu|cuda|all] [--quick] [--json PATH] [--markdown PATH]

The cases, timing and table are those of `tatitok-fast bench ops --ops mask_by_order`
(tatitok_fast/benchmarks/ops.py); this script only picks the op.
"""
import sys

from tatitok_fast.benchmarks.ops import script_main

if __name__ == "__main__":
    sys.exit(script_main(["mask_by_order"]))
