"""``sparsedict convert <src> <dst> [--to sparsedict|saelens|circuit_tracer]``: rewrite a checkpoint in another format.

``src`` is anything :func:`sparsedict.from_pretrained` loads (our format, SAELens, sparsify, dictionary_learning,
circuit-tracer; a local directory or a hub repo id with ``--subfolder``/``--revision``). ``dst`` is a new
directory. ``circuit_tracer`` writes a transcoder set or a cross-layer transcoder in circuit-tracer's layout. After
writing, the converted checkpoint is loaded back and checked on random inputs against the source (same codes
and reconstruction), so a conversion that changes numbers fails loudly instead of producing a silent copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

TARGETS = ("sparsedict", "saelens", "circuit_tracer")


@dataclass
class ConvertConfig:
    """Options of ``sparsedict convert``."""

    src: str = field(default="", metadata={"positional": True})
    """Source checkpoint: local directory or hub repo id (any supported format)."""
    dst: str = field(default="", metadata={"positional": True})
    """Destination directory (created; must be empty unless --overwrite)."""
    to: str = "sparsedict"
    """Output format: 'sparsedict' (config.json + model.safetensors + README.md), 'saelens' or 'circuit_tracer'
    (a transcoder set or a cross-layer transcoder: config.yaml + per-layer safetensors)."""
    subfolder: str = ""
    """Dictionary inside src holding several (sparsify hookpoint directory, hub repo folder)."""
    revision: str = ""
    """Hub revision (branch, tag or commit) when src is a repo id."""
    overwrite: bool = False
    """Allow writing into a non-empty destination directory."""
    check_tokens: int = 256
    """Random inputs used to verify the converted checkpoint against the source (0 skips the check)."""


def verify(src_model, dst_model, n: int, seed: int = 0) -> float:
    """Max abs difference of reconstructions on ``n`` random inputs ``[n, d_in]`` (``[n, L, d_in]`` for a
    transcoder set or cross-layer transcoder), checked against tolerances.

    Raises ``RuntimeError`` when the active sets differ, when a code differs by more than
    ``1e-4·(1 + max|code|)`` or when a reconstruction differs by more than ``1e-4·(1 + max|x̂|)``.
    """
    g = torch.Generator().manual_seed(seed)
    if getattr(src_model, "layered", False):  # transcoders of several layers: rows [n, L, d_in]
        x = torch.randn(n, src_model.n_layers, src_model.d_in, generator=g)
    else:
        scale = float(src_model.W_dec.detach().float().norm(dim=1).mean()) or 1.0
        x = torch.randn(n, src_model.d_in, generator=g) * scale
        if src_model.d_out == src_model.d_in:
            x = x + src_model.b_dec.detach().float().cpu()
    with torch.no_grad():
        a, b = src_model.float().cpu(), dst_model.float().cpu()
        ca, cb = a.encode(x), b.encode(x)
        da, db = ca.to_dense(), cb.to_dense()
        if not torch.equal(da != 0, db != 0):
            raise RuntimeError(
                "conversion changed which latents are active on random inputs: refusing the result"
            )
        code_err = float((da - db).abs().max())
        xa = a.decode(ca, x)
        err = float((xa - b.decode(cb, x)).abs().max())
    tol = 1e-4 * (1 + float(da.abs().max()))
    if code_err > tol:
        raise RuntimeError(f"conversion changed the codes by up to {code_err:.3g} on random inputs")
    tol_x = 1e-4 * (1 + float(xa.abs().max()))
    if not err <= tol_x:  # also catches NaN
        raise RuntimeError(
            f"conversion changed the reconstruction by up to {err:.3g} on random inputs (tolerance {tol_x:.3g}): "
            "refusing the result"
        )
    return err


def convert(cfg: ConvertConfig) -> Path:
    """Load ``cfg.src``, write it to ``cfg.dst`` in format ``cfg.to``, reload and verify; returns dst."""
    from sparsedict.dictionaries import from_pretrained

    if cfg.to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, not {cfg.to!r}")
    if not cfg.src or not cfg.dst:
        raise ValueError("usage: sparsedict convert <src> <dst> [--to sparsedict|saelens|circuit_tracer]")
    dst = Path(cfg.dst)
    if dst.exists() and any(dst.iterdir()) and not cfg.overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose a new directory or pass --overwrite")
    model = from_pretrained(cfg.src, subfolder=cfg.subfolder or None, revision=cfg.revision or None)
    if cfg.to == "saelens":
        from sparsedict.formats.saelens import save_saelens

        save_saelens(model, dst)
    elif cfg.to == "circuit_tracer":
        from sparsedict.formats.circuit_tracer import save_circuit_tracer

        save_circuit_tracer(model, dst)
    else:
        model.save_pretrained(dst)  # a transcoder set writes its own layout
    if cfg.check_tokens > 0:
        back = from_pretrained(dst)
        err = verify(model, back, cfg.check_tokens)
        print(f"verified on {cfg.check_tokens} random inputs: max |x̂_src − x̂_dst| = {err:.3g}")
    return dst
