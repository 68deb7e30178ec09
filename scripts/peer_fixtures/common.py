"""Shared helpers of the peer fixture generators (run inside each peer's throwaway venv).

Each fixture is a directory ``tests/data/peers/<library>/<name>/`` holding

- ``checkpoint/``: exactly what the peer library wrote with its own save function;
- ``expected.safetensors``: fixed inputs and the peer's own outputs on them (float32);
- ``fixture.json``: library, version, class, how the checkpoint was made and what each output tensor is.

Only torch, safetensors and the standard library are used here, so this file runs in every peer venv.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2] / "tests" / "data" / "peers"
BATCH = 32


def fresh_dir(library: str, name: str) -> Path:
    """An empty fixture directory (any previous content removed)."""
    path = ROOT / library / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def inputs(d: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """Fixed inputs ``[BATCH, d]``: Gaussian rows times ``scale`` plus a shared random offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, d, generator=g) * scale
    return x + offset * torch.randn(d, generator=g)


def write(path: Path, package: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write ``expected.safetensors`` and ``fixture.json`` (library name and version read from the venv)."""
    tensors = {k: v.detach().float().cpu().clone() for k, v in tensors.items()}
    save_file(tensors, str(path / "expected.safetensors"))
    info = {
        "library": package,
        "version": version(package),
        "torch": torch.__version__,
        **meta,
        "tensors": {k: list(v.shape) for k, v in sorted(tensors.items())},
    }
    (path / "fixture.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def randomise(
    module: torch.nn.Module, seed: int, scales: dict[str, float], shifts: dict[str, float] | None = None
):
    """Overwrite the named parameters/buffers with seeded Gaussian values (``scale · N(0,1) + shift``)."""
    g = torch.Generator().manual_seed(seed)
    shifts = shifts or {}
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for name, scale in scales.items():
            t = state[name]
            t.copy_(
                torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * scale
                + shifts.get(name, 0.0)
            )
