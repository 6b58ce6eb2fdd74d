"""Benchmarks of tatitok_fast against the reference paths: one harness (harness.py) and one
module per suite (ops.py; run with `tatitok-fast bench <suite>`)."""
from tatitok_fast.benchmarks.harness import Measurement, Report, Timing, commit_id, measure, peak_extra_bytes

__all__ = ["Measurement", "Report", "Timing", "commit_id", "measure", "peak_extra_bytes"]
