"""Fused vs reference execution, switched per context (thread- and task-local).

    with reference_mode():   # plain eager path: PyTorch twins of every fused op, math attention
        model.generate(...)

Benchmarks use it for the "eager fp32" column; tests use it to compare the two paths.
"""
from __future__ import annotations

import contextlib
import contextvars

_FUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("tatitok_fast_fused", default=True)


def fused_enabled() -> bool:
    """False inside reference_mode(): models then use the PyTorch twins of the kernels."""
    return _FUSED.get()


@contextlib.contextmanager
def reference_mode(enabled: bool = True):
    token = _FUSED.set(not enabled)
    try:
        yield
    finally:
        _FUSED.reset(token)
