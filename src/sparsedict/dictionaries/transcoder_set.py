"""Transcoder sets: one per-layer transcoder (PLT) for every layer of a range, handled as one object.

A set is described by one config of any single-layer architecture whose ``layers`` name the range and whose
``hookpoint``/``target`` are alias kinds or ``{layer}`` templates (``mlp_in``/``mlp_out``); layer ``l``'s
transcoder has that config at ``mlp_in.l -> mlp_out.l``. The trainer trains the members side by side in one
pass, each with its own optimiser, dead-latent counters and input normalisation, all on the same rows of one
multi-hookpoint source (the set's ``source_key``, ``[B, L, d]`` batches; member i reads slice i). A set is
saved as one directory (one ``config.json``, one ``model.safetensors`` with the members' tensors under
``layer{l}.``) and ``from_pretrained`` returns it.

It speaks the multi-layer interface of :class:`~sparsedict.dictionaries.clt.CLT`: ``forward(x [B, L, d_in],
y)`` on raw activations (each member applies its own input scale), a code over ``L·n`` latents (layer
position i's at ``[i·n, (i+1)·n)``), per-layer statistics (:meth:`new_stats`), ``encode_layer``/``decode_layer``
for the replacement model (:meth:`hook`) and the circuit-tracer export.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedict import hub
from sparsedict.cache.hooks import at_layer
from sparsedict.dictionaries.attach import LayeredAttachment
from sparsedict.dictionaries.base import (
    ARCHITECTURES,
    Dictionary,
    DictionaryConfig,
    LayerRange,
    Output,
    SparseCode,
    build,
    lookup,
)
from sparsedict.formats import load_dir, native
from sparsedict.metrics import LayerwiseStats, layer_code


def member_config(cfg: DictionaryConfig, layer: int) -> DictionaryConfig:
    """The config of a set's transcoder at ``layer`` (hookpoint and target named for that layer, no ``layers``)."""
    target = at_layer(cfg.target, layer) if cfg.is_transcoder else ""
    name = f"{cfg.name}/layer{layer}" if cfg.name else ""
    return dataclasses.replace(
        cfg, hookpoint=at_layer(cfg.hookpoint, layer), target=target, layers=[], name=name
    )


@ARCHITECTURES.register_set
class TranscoderSet(LayerRange, nn.Module):
    """Per-layer dictionaries of ``cfg.layers`` (``members``: layer -> dictionary; built from ``cfg`` if None)."""

    architecture: ClassVar[str] = "transcoder_set"
    layered: ClassVar[bool] = True
    latent_sharded: ClassVar[bool] = False

    def __init__(self, cfg: DictionaryConfig, members: dict[int, Dictionary] | None = None):
        super().__init__()
        if not cfg.layers or sorted(set(cfg.layers)) != list(cfg.layers):
            raise ValueError(f"a transcoder set needs increasing distinct 'layers', got {cfg.layers}")
        if lookup(cfg.architecture)[0].layered:
            raise ValueError(
                f"{cfg.architecture!r} spans its layers itself; a transcoder set holds single-layer ones"
            )
        self.cfg = cfg
        if members is None:
            members = {layer: build(member_config(cfg, layer)) for layer in cfg.layers}
        if sorted(members) != list(cfg.layers):
            raise ValueError(f"members for layers {sorted(members)} but the config names {cfg.layers}")
        widths = {(m.d_in, m.d_out, m.n_latents) for m in members.values()}
        if len(widths) > 1:
            raise ValueError(
                f"the members of a transcoder set need one shape (d_in, d_out, n), got {sorted(widths)}"
            )
        self.transcoders = nn.ModuleList([members[layer] for layer in cfg.layers])
        self.meta: dict[str, Any] = {}

    # -- shapes and members ------------------------------------------------------------------------------------
    @property
    def member_architecture(self) -> str:
        return self.cfg.architecture

    @property
    def n_per_layer(self) -> int:
        return self.transcoders[0].n_latents

    @property
    def n_latents(self) -> int:
        return self.n_layers * self.n_per_layer

    @property
    def d_in(self) -> int:
        return self.transcoders[0].d_in

    @property
    def d_out(self) -> int:
        return self.transcoders[0].d_out

    @property
    def input_scale(self) -> Tensor:
        """1: the set works on raw activations (each member applies its own scale)."""
        return torch.ones(())

    def __getitem__(self, layer: int) -> Dictionary:
        """The transcoder of block ``layer``."""
        if layer not in self.cfg.layers:
            raise KeyError(f"this transcoder set covers layers {self.cfg.layers}, not {layer}")
        return self.transcoders[self.cfg.layers.index(layer)]

    def items(self) -> list[tuple[int, Dictionary]]:
        return list(zip(self.cfg.layers, self.transcoders, strict=True))

    def new_stats(self) -> LayerwiseStats:
        return LayerwiseStats(self.layers, self.n_per_layer)

    # -- running it on [B, L, d] batches (raw activations) ------------------------------------------------------
    def _check(self, x: Tensor, dim: int, what: str) -> None:
        if x.ndim != 3 or x.shape[1:] != (self.n_layers, dim):
            raise ValueError(
                f"a transcoder set of layers {self.layers} expects {what} [batch, {self.n_layers}, {dim}], got "
                f"{list(x.shape)}"
            )

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        """Every member on its layer of raw ``x [B, L, d_in]`` (``target [B, L, d_out]``): ``ŷ [B, L, d_out]``,
        the code over all members' latents, losses summed over members."""
        self._check(x, self.d_in, "inputs")
        outs, codes, losses = [], [], {}
        for i, m in enumerate(self.transcoders):
            c = float(m.input_scale)
            y = None if target is None else target[:, i] * c
            out = m(x[:, i] * c, y)
            outs.append(out.x_hat / c)
            codes.append(out.code)
            for key, v in out.losses.items():
                losses[key] = losses[key] + v if key in losses else v
        return Output(torch.stack(outs, 1), self._concat(codes), losses)

    def _concat(self, codes: list[SparseCode]) -> SparseCode:
        n = self.n_per_layer
        if all(c.is_sparse for c in codes):
            idx = torch.cat([c.indices + i * n for i, c in enumerate(codes)], 1)
            return SparseCode(torch.cat([c.values for c in codes], 1), idx, self.n_latents)
        return SparseCode(torch.cat([c.to_dense() for c in codes], 1), None, self.n_latents)

    def encode(self, x: Tensor) -> SparseCode:
        self._check(x, self.d_in, "inputs")
        return self._concat([self.encode_layer(i, x[:, i]) for i in range(self.n_layers)])

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        n = self.n_per_layer
        parts = [layer_code(code, i * n, n) for i in range(self.n_layers)]
        return torch.stack(
            [self.decode_layer(j, parts, None if x is None else x[:, j]) for j in range(self.n_layers)], 1
        )

    def encode_layer(self, i: int, x: Tensor) -> SparseCode:
        """Code of the transcoder at layer position i for its raw input ``x [M, d_in]``."""
        m = self.transcoders[i]
        return m.encode(x.to(m.W_enc.dtype) * float(m.input_scale))

    def decode_layer(self, j: int, codes: list[SparseCode], x: Tensor | None = None,
                     contributions: dict[int, Tensor] | None = None) -> Tensor:  # fmt: skip
        """Raw output of the transcoder at layer position j from its own code (``codes[j]``; ``contributions``:
        unused, a transcoder's output depends on its own layer alone)."""
        m = self.transcoders[j]
        c = float(m.input_scale)
        return m.decode(codes[j], None if x is None else x.to(m.W_enc.dtype) * c).float() / c

    def hook(self, model: nn.Module, mode: str = "splice", exclude_first: int = 0) -> LayeredAttachment:
        """Context manager replacing every MLP output of the range by its transcoder's at once."""
        return LayeredAttachment(self, model, mode, exclude_first)

    # -- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                        model_card: bool = True) -> Path:  # fmt: skip
        """One directory: ``config.json`` (the set's config, each member's meta) + ``model.safetensors``."""
        return native.save_set(self, path, meta, model_card)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> TranscoderSet:  # fmt: skip
        """Load a transcoder set (ours, or circuit-tracer's ``transcoder_set``); see ``sparsedict.from_pretrained``."""
        out = load_dir(
            hub.resolve(path_or_repo_id, subfolder, revision), ARCHITECTURES, device, dtype, hub.fetch_uri
        )
        if not isinstance(out, cls):
            raise TypeError(f"{path_or_repo_id} holds a {out.architecture}, not a transcoder set")
        return out

    @property
    def source_key(self) -> tuple[Any, Any]:
        return self.cfg.source_key
