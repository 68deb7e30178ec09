"""Shared helpers for the kernel tests: error ratios, input builders, canonical ordering."""

from __future__ import annotations

import torch
from torch import Tensor


def err_ratio(a: Tensor, ref: Tensor) -> float:
    """Relative RMS error ``‖a − ref‖ / ‖ref‖`` in float64 (0 when both are zero); NaN-checked."""
    assert not torch.isnan(a).any(), "NaN in the tested output"
    a, ref = a.double(), ref.double()
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num if den == 0 else num / den


def encode_inputs(B: int, d: int, n: int, dtype: torch.dtype, kind: str, seed: int = 0):
    """``x [B, d]``, ``W_enc [d, n]``, ``b_enc [n]`` as leaf tensors requiring grad.

    kind 'randn': continuous values; 'grid': multiples of 1/4 with few levels, so every pre-activation is
    exactly representable in bf16 and fp32 (any summation order gives the same value) and ties are common;
    'dupcols': randn with every 3rd column of W_enc a copy of another column and equal biases (exact ties).
    """
    g = torch.Generator().manual_seed(seed)
    if kind == "grid":
        x = torch.randint(-3, 4, (B, d), generator=g) / 4
        W = torch.randint(-2, 3, (d, n), generator=g) / 2
        b = torch.randint(-2, 3, (n,), generator=g) / 4
    else:
        x = torch.randn(B, d, generator=g)
        W = torch.randn(d, n, generator=g) / d**0.5
        b = torch.randn(n, generator=g) * 0.1
        if kind == "dupcols":
            src = torch.arange(0, n, 3)
            dst = torch.randperm(n, generator=g)[: src.numel()]
            W[:, dst] = W[:, src]
            b[dst] = b[src]
    return [t.to(dtype).requires_grad_() for t in (x, W, b)]


def by_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Order each row's (value, index) pairs by index, for order-insensitive comparisons."""
    o = indices.argsort(dim=-1)
    return values.gather(1, o), indices.gather(1, o)


def triton_interpreter_module(test_file: str, clear_env: tuple[str, ...] = ("SPARSEDICT_DISABLE_TRITON",)):
    """Set up a test module that runs Triton kernels under the CPU interpreter.

    Triton's interpreter must be on when ``triton`` is first imported (its standard library, tl.min/tl.sort,
    is decorated then). Call this before importing triton or sparsedict's kernels; it returns
    ``(test_interpreter_in_fresh_process, interpret_fixture)`` for the module to bind at top level: when this
    process already imported triton compiled, every test of the module is skipped and the first one reruns
    the whole file in a fresh process instead.
    """
    import os
    import subprocess
    import sys

    import pytest

    # triton already imported with the interpreter on (by an earlier module of this kind) is fine too
    in_process = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
    if in_process:
        os.environ["TRITON_INTERPRET"] = "1"

    @pytest.mark.skipif(in_process, reason="runs only when this process cannot host the interpreter")
    def test_interpreter_in_fresh_process():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        env.pop("SPARSEDICT_DISABLE_TRITON", None)
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
            env=env,
            cwd=os.path.dirname(test_file),
        )
        assert r.returncode == 0

    @pytest.fixture(autouse=True)
    def interpret(monkeypatch, request):
        if not in_process and request.node.name != "test_interpreter_in_fresh_process":
            pytest.skip(
                "triton was imported compiled in this process; test_interpreter_in_fresh_process runs these"
            )
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        for name in clear_env:
            monkeypatch.delenv(name, raising=False)

    return test_interpreter_in_fresh_process, interpret
