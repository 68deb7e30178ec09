"""Helpers shared by the kernel modules: lazy Triton JIT, backend choice, launch heuristics.

Triton decides between compiling a kernel and interpreting it (``TRITON_INTERPRET=1``) when the
kernel is *decorated*. Dictionaries import :mod:`sparsedict.kernels` long before a test can set that
variable, so kernels here are wrapped in :class:`LazyJit`, which decorates the plain Python function at
launch time, once per mode. That lets CPU tests run the real kernels in the interpreter inside the same
pytest process as everything else, and it keeps ``import sparsedict.kernels`` free of Triton.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

BACKENDS = ("auto", "ref", "triton", "cpu")
CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""dtypes the CPU (numba) kernels take; they compute in fp32 (float64 inputs use the reference)."""


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def use_triton(t: Tensor) -> bool:
    """True when ``t`` lives on CUDA, Triton imports and ``SPARSEDICT_DISABLE_TRITON`` is unset.

    ``SPARSEDICT_FORCE_TRITON=1`` together with ``TRITON_INTERPRET=1`` also selects Triton on CPU
    tensors (the interpreter; for tests only, it is slow).
    """
    if _env_on("SPARSEDICT_DISABLE_TRITON") or not triton_available():
        return False
    if t.is_cuda:
        return True
    return _env_on("SPARSEDICT_FORCE_TRITON") and interpreting()


def use_cpu_kernels(t: Tensor) -> bool:
    """True when ``t`` is a CPU tensor of a :data:`CPU_DTYPES` dtype, numba imports and
    ``SPARSEDICT_DISABLE_CPU_KERNELS`` is unset: the CPU (numba) kernels are the automatic choice."""
    from sparsedict.kernels.topk_cpu import numba_available

    return (
        t.device.type == "cpu"
        and t.dtype in CPU_DTYPES
        and not _env_on("SPARSEDICT_DISABLE_CPU_KERNELS")
        and numba_available()
    )


def resolve_backend(backend: str | None, t: Tensor, op: str) -> str:
    """Map ``backend`` (None/'auto', 'ref', 'triton', 'cpu') to 'ref', 'triton' or 'cpu' for tensor ``t``.

    'auto': Triton where :func:`use_triton` holds, the CPU kernels where :func:`use_cpu_kernels` holds,
    else the reference.
    """
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "auto":
        return "triton" if use_triton(t) else "cpu" if use_cpu_kernels(t) else "ref"
    if backend == "cpu":
        from sparsedict.kernels.topk_cpu import numba_available

        if not numba_available():
            raise RuntimeError(f"{op}: backend='cpu' needs the numba package (pip install numba)")
        if t.device.type != "cpu" or t.dtype not in CPU_DTYPES:
            raise RuntimeError(
                f"{op}: backend='cpu' takes CPU tensors of {[str(d) for d in CPU_DTYPES]}, got a "
                f"{t.device.type} {t.dtype} tensor; use backend='ref' (or 'auto')"
            )
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                f"{op}: backend='triton' needs the triton package (pip install 'sparsedict[kernels]')"
            )
        if not t.is_cuda and not interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' got a {t.device.type} tensor; Triton kernels need CUDA tensors, "
                "or set TRITON_INTERPRET=1 to run them in Triton's (slow) CPU interpreter"
            )
    return backend


class LazyJit:
    """``triton.jit`` applied at first launch (per interpret mode) instead of at import time."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: dict[bool, Any] = {}

    def __getitem__(self, grid):
        mode = interpreting()
        if mode not in self._compiled:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language  # the kernel modules leave ``tl`` unbound until now
            self._compiled[mode] = triton.jit(self.fn)
        return self._compiled[mode][grid]


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def num_sms(t: Tensor) -> int:
    """Streaming multiprocessors of ``t``'s device (4 in the interpreter, to exercise the split logic)."""
    if t.is_cuda:
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 4


def tl_float(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, op: str, t: Tensor) -> None:
    if not tl_float(t.dtype):
        raise TypeError(
            f"{op}: {name} has dtype {t.dtype}; the Triton kernels take float32, bfloat16 or float16"
        )
