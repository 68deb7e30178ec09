"""Run a dictionary inside a HF causal LM: read its codes and/or splice its reconstruction.

``dictionary.hook(model, mode)`` returns an :class:`Attachment`, a context manager that, while open, runs the
dictionary on every forward pass at its hookpoint through :func:`sparsedict.cache.hooks.replace`:

- ``mode="codes"``: the model runs unchanged; each forward appends the codes to ``att.codes``;
- ``mode="splice"``: the activation at the target is replaced by the dictionary's output;
- ``mode="both"``: splice and keep the codes.

An SAE reads and writes its ``hookpoint``. A transcoder reads ``hookpoint`` (captured by an identity replace)
and writes ``target``: its output substitutes the target activation of the same forward pass. A multi-layer
dictionary (cross-layer transcoder, transcoder set) attaches through :class:`LayeredAttachment`: every output of
its layer range replaced at once (the replacement model), or some of them. Activations
``[B, T, d]`` are flattened to ``[B·T, d]`` for the dictionary (:func:`reconstruct`, which honours an
unfolded input scale) and the result is cast back to the model's dtype.

Which positions are replaced, by default: those the dictionary was trained on, from the exclusion rules its
checkpoint records (``meta["exclusions"]``: BOS, the first n positions, special tokens, padding; the token ids
come from the model's ``input_ids``, positions from ``cache_position``/``position_ids`` when given); excluded
positions (the attention sinks) keep the model's own activation. A dictionary with no recorded rules (most
peer checkpoints) replaces every position. ``exclude_first=n`` replaces exactly the positions ``t >= n``
instead (0: all), and a ``keep [B, T]`` mask exactly its positions (the evaluator passes the cache's mask; only
the kept rows then go through the dictionary). ``on_output(y, ŷ, code)`` sees the replaced rows,
``error_term=True`` splices ``ŷ + (y − ŷ)`` (must reproduce the clean model). While attached the dictionary is
in eval mode (BatchTopK selects by its threshold θ, not over the tokens of the forward); its mode is restored
on exit. A width that does not match the dictionary (a checkpoint for another model or hookpoint) raises a
clear error from inside the forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from sparsedict.cache import hooks
from sparsedict.cache.tokens import Exclusions

MODES = ("splice", "codes", "both")

OnOutput = Callable[[Tensor, Tensor, Any], None]
"""``on_output(y [M, d], ŷ [M, d], code)``: the replaced rows (fp32) and their code."""


@torch.no_grad()
def reconstruct(dictionary: nn.Module, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Any]:
    """``(ŷ [..., d_out] fp32 on the dictionary's device, code over the flattened rows)`` of raw ``x [..., d_in]``.

    ``y`` is a transcoder's target. A dictionary still holding an input scale c ≠ 1 (trained on ``c·x``) is fed
    ``c·x`` and its output divided by c, so ``ŷ`` is always at the activations' own scale. A multi-layer
    dictionary (``layered``) takes ``x [..., L, d_in]`` and gives ``ŷ [..., L, d_out]``.
    """
    c = float(dictionary.input_scale)
    p = next(dictionary.parameters())
    row = 2 if dictionary.layered else 1  # trailing dims of one row
    xs = x.reshape(-1, *x.shape[-row:]).to(p.device, p.dtype) * c
    ys = None if y is None else y.reshape(-1, *y.shape[-row:]).to(p.device, p.dtype) * c
    out = dictionary(xs, ys)
    y_hat = out.x_hat.float() / c
    return y_hat.reshape(*x.shape[:-1], y_hat.shape[-1]), out.code


def replaced_positions(act: Tensor, keep: Tensor | None, exclude_first: int) -> Tensor | None:
    """``[B, T]`` bool mask of the positions of ``act [B, T, d]`` to replace: ``keep``, else those with
    ``t >= exclude_first``; None: all of them."""
    if keep is not None:
        return keep
    if exclude_first > 0 and act.ndim == 3:
        mask = torch.ones(act.shape[:-1], dtype=torch.bool, device=act.device)
        mask[:, :exclude_first] = False
        return mask
    return None


def _code_rows(code, rows: Tensor | None):
    """The code restricted to ``rows`` (a boolean mask over its rows), detached."""
    values, indices = code.values.detach(), None if code.indices is None else code.indices.detach()
    if rows is not None:
        values, indices = values[rows], None if indices is None else indices[rows]
    return dataclasses.replace(code, values=values, indices=indices)


class Attachment:
    """Context manager produced by ``dictionary.hook(model)``; holds the codes of every forward pass while open.

    ``codes[i]`` is the code of forward ``i`` over its ``B·T`` tokens (row ``b·T + t``); ``shapes[i] = (B, T)``.
    :meth:`dense` gives them as ``[B, T, n]``.
    """

    def __init__(
        self,
        dictionary: nn.Module,
        model: nn.Module,
        mode: str = "splice",
        exclude_first: int | None = None,
        keep: Tensor | None = None,
        error_term: bool = False,
        on_output: OnOutput | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not dictionary.cfg.hookpoint:
            raise ValueError(
                f"this {dictionary.architecture} dictionary has no hookpoint in its config; set "
                "dictionary.cfg.hookpoint (e.g. 'resid_post.6' or 'model.layers.6') before attaching it"
            )
        self.dictionary = dictionary
        self.model = model
        self.mode = mode
        self.exclude_first = None if exclude_first is None else int(exclude_first)
        """Positions ``t < exclude_first`` keep the model's own activation when splicing; None: the recorded rules."""
        self.exclusions = (
            Exclusions.from_meta(dictionary.meta) if exclude_first is None and keep is None else None
        )
        """The training cache's exclusion rules applied by default (None: an explicit choice, or none recorded)."""
        self.keep = keep
        """``[B, T]`` bool: exactly these positions are replaced (and seen by ``on_output``); None: see above."""
        self.error_term = error_term
        self.on_output = on_output
        self.transcoder = dictionary.cfg.is_transcoder
        self.input_point = hooks.resolve(model, dictionary.cfg.hookpoint)
        self.output_point = (
            hooks.resolve(model, dictionary.cfg.target) if self.transcoder else self.input_point
        )
        self.codes: list[Any] = []
        self.shapes: list[tuple[int, ...]] = []
        self._stack: contextlib.ExitStack | None = None
        self._pending: Tensor | None = None
        self._kept: Tensor | None = None  # the recorded rules applied to the current forward's input_ids

    # -- results -------------------------------------------------------------------------------------
    @property
    def last(self):
        """Codes of the most recent forward pass."""
        if not self.codes:
            raise RuntimeError(
                "no codes recorded yet: run the model inside the `with` block (mode 'codes'/'both')"
            )
        return self.codes[-1]

    def dense(self, i: int = -1) -> Tensor:
        """Codes of forward ``i`` as a dense ``[B, T, n]`` tensor."""
        return self.codes[i].to_dense().reshape(*self.shapes[i], -1)

    def clear(self) -> None:
        self.codes.clear()
        self.shapes.clear()

    # -- hooks ---------------------------------------------------------------------------------------------
    def _check(self, act: Tensor, want: int, what: str, point: hooks.Hookpoint) -> None:
        if act.shape[-1] != want:
            raise ValueError(
                f"{self.dictionary.architecture} dictionary expects {what} of width {want} at {point.name!r} "
                f"({point.path}) but {type(self.model).__name__} produces width {act.shape[-1]} there: the "
                f"checkpoint was made for another model or hookpoint (its model: "
                f"{self.dictionary.meta.get('model') or 'not recorded'})"
            )

    def _replaced(self, target: Tensor) -> Tensor | None:
        """``[..., T]`` bool mask of the positions to replace (None: all of them)."""
        if self.keep is not None:
            return self.keep
        if target.ndim != 3:
            return None
        if self.exclusions is not None:
            if self._kept is not None and self._kept.shape == target.shape[:-1]:
                return self._kept.to(target.device)
            first = self.exclusions.first_n  # no input_ids (inputs_embeds): the position rule alone
        else:
            first = self.exclude_first or 0
        if first > 0:
            mask = torch.ones(target.shape[:-1], dtype=torch.bool, device=target.device)
            mask[:, :first] = False
            return mask
        return None

    def _read_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook on the model: the kept positions of this forward under the recorded rules."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._kept = None
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
            return
        attn = kwargs.get("attention_mask")
        attn = attn if isinstance(attn, Tensor) and attn.shape == ids.shape else None
        pos = kwargs.get("cache_position")
        if not isinstance(pos, Tensor) or pos.shape[-1] != ids.shape[-1]:
            pos = kwargs.get("position_ids")
            pos = pos if isinstance(pos, Tensor) and pos.shape[-1] == ids.shape[-1] else None
        self._kept = self.exclusions.keep(ids, attn, pos)

    def _run(self, x: Tensor, target: Tensor) -> Tensor:
        self._check(target, self.dictionary.d_out, "outputs", self.output_point)
        y_in = target if self.transcoder else None
        mask = self._replaced(target)
        record = self.mode != "splice"
        if self.keep is not None and not record:  # only the kept rows go through the dictionary
            y_hat, code = reconstruct(
                self.dictionary, x[mask].float(), None if y_in is None else y_in[mask].float()
            )
            rows = None
        else:  # every row (codes cover all B·T tokens)
            y_hat, code = reconstruct(self.dictionary, x, y_in)
            if record:
                self.codes.append(_code_rows(code, None))
                self.shapes.append(tuple(x.shape[:-1]))
            y_hat = y_hat.reshape(-1, y_hat.shape[-1])
            rows = None if mask is None else mask.reshape(-1)
            if rows is not None:
                y_hat = y_hat[rows]
        if self.mode == "codes":
            return target
        y = target.reshape(-1, target.shape[-1]) if mask is None else target[mask]
        if self.on_output is not None:
            self.on_output(y.float(), y_hat, _code_rows(code, rows))
        if self.error_term:
            y_hat = y_hat + (y.float() - y_hat)
        if mask is None:
            return y_hat.reshape(target.shape).to(target)
        out = target.clone()
        out[mask] = y_hat.to(target)
        return out

    def _sae_fn(self, act: Tensor) -> Tensor:
        self._check(act, self.dictionary.d_in, "inputs", self.input_point)
        return self._run(act, act)

    def _capture_fn(self, act: Tensor) -> Tensor:
        self._check(act, self.dictionary.d_in, "inputs", self.input_point)
        self._pending = act
        return act

    def _target_fn(self, act: Tensor) -> Tensor:
        if self._pending is None:
            raise RuntimeError(
                f"transcoder target {self.output_point.name!r} fired before its input {self.input_point.name!r}: "
                "the input hookpoint must come earlier in the forward pass"
            )
        x, self._pending = self._pending, None
        return self._run(x, act)

    def __enter__(self) -> Attachment:
        stack = contextlib.ExitStack()
        try:
            stack.callback(self.dictionary.train, self.dictionary.training)  # restore the mode on exit
            self.dictionary.eval()
            if self.exclusions is not None:
                handle = self.model.register_forward_pre_hook(self._read_ids, with_kwargs=True)
                stack.callback(handle.remove)
            if self.transcoder:
                stack.enter_context(hooks.replace(self.model, self.input_point, self._capture_fn))
                stack.enter_context(hooks.replace(self.model, self.output_point, self._target_fn))
            else:
                stack.enter_context(hooks.replace(self.model, self.input_point, self._sae_fn))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._pending = None
        self._kept = None


class LayeredAttachment:
    """Context manager running a multi-layer dictionary (a cross-layer transcoder or a transcoder set) inside a
    model: the *replacement model*, every output of its layer range replaced by the dictionary's, at once.

    The dictionary provides ``cfg.hookpoints``/``cfg.targets`` (one per layer), ``encode_layer(i, x_i)`` (the
    code of layer position i from its raw input ``[M, d_in]``) and ``decode_layer(j, codes, x_j, cache)`` (the
    raw output of layer position j from the codes of positions ``0 … j``; ``cache``, a dict kept for one forward,
    lets a CLT decode each layer's code once for all the outputs it writes). At each input hookpoint the activation
    is encoded (the model runs on); at each replaced target the output is decoded from the codes of this forward
    pass, so later layers read inputs computed from the replaced outputs before them. ``layers`` (positions)
    limits the replaced outputs (per-layer splicing: one output replaced, the rest of the model clean); the codes
    of every layer up to the last replaced one are still computed. Positions as :class:`Attachment` (``keep``,
    ``exclude_first``); ``error_term=True`` writes ``ŷ + (y − ŷ)`` (reproduces the clean model); modes 'codes'
    and 'both' keep every forward's code over all features (``codes[i]``, rows ``b·T + t``).
    """

    def __init__(self, dictionary: nn.Module, model: nn.Module, mode: str = "splice", exclude_first: int = 0,
                 keep: Tensor | None = None, error_term: bool = False,
                 layers: list[int] | None = None) -> None:  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.dictionary, self.model, self.mode = dictionary, model, mode
        self.exclude_first, self.keep, self.error_term = int(exclude_first), keep, error_term
        n = len(dictionary.cfg.hookpoints)
        self.replaced = sorted(set(range(n) if layers is None else layers))
        if not self.replaced or not all(0 <= j < n for j in self.replaced):
            raise ValueError(
                f"layers must be positions in 0..{n - 1} of the dictionary's layers, got {layers}"
            )
        self.n_read = n if mode != "splice" else self.replaced[-1] + 1
        self.input_points = [hooks.resolve(model, h) for h in dictionary.cfg.hookpoints]
        self.output_points = [hooks.resolve(model, h) for h in dictionary.cfg.targets]
        self.codes: list[Any] = []
        self.shapes: list[tuple[int, ...]] = []
        self._stack: contextlib.ExitStack | None = None
        self._codes: dict[int, Any] = {}
        self._inputs: dict[int, Tensor] = {}
        self._contributions: dict[int, Tensor] = {}  # the decoder's per-forward cache (decode_layer)

    def _rows(self, act: Tensor) -> Tensor | None:
        """Mask of the rows that go through the dictionary (None: all), as in :class:`Attachment`."""
        return None if self.mode != "splice" else replaced_positions(act, self.keep, self.exclude_first)

    def _input_fn(self, i: int):
        def fn(act: Tensor) -> Tensor:
            if act.shape[-1] != self.dictionary.d_in:
                raise ValueError(
                    f"{self.dictionary.architecture} expects inputs of width {self.dictionary.d_in} at "
                    f"{self.input_points[i].name!r} but the model produces width {act.shape[-1]} there"
                )
            if i == 0:
                self._codes.clear()
                self._inputs.clear()
                self._contributions.clear()
            mask = self._rows(act)
            x = (act.reshape(-1, act.shape[-1]) if mask is None else act[mask]).float()
            with torch.no_grad():
                self._codes[i] = self.dictionary.encode_layer(i, x)
            self._inputs[i] = x
            if self.mode != "splice" and i == self.n_read - 1:
                self._record(act)
            return act

        return fn

    def _record(self, act: Tensor) -> None:
        parts = [self._codes[i] for i in range(self.n_read)]
        n = parts[0].n_latents
        if all(p.indices is not None for p in parts):
            code = dataclasses.replace(parts[0], values=torch.cat([p.values for p in parts], 1).detach(),
                                       indices=torch.cat([p.indices + i * n for i, p in enumerate(parts)], 1),
                                       n_latents=n * len(parts))  # fmt: skip
        else:
            dense = torch.cat([p.to_dense() for p in parts], 1).detach()
            code = dataclasses.replace(parts[0], values=dense, indices=None, n_latents=n * len(parts))
        self.codes.append(code)
        self.shapes.append(tuple(act.shape[:-1]))

    def _output_fn(self, j: int):
        def fn(act: Tensor) -> Tensor:
            if self.mode == "codes" or j not in self.replaced:
                return act
            if act.shape[-1] != self.dictionary.d_out:
                raise ValueError(
                    f"{self.dictionary.architecture} writes width {self.dictionary.d_out} at "
                    f"{self.output_points[j].name!r} but the model has width {act.shape[-1]} there"
                )
            missing = [i for i in range(j + 1) if i not in self._codes]
            if missing:
                raise RuntimeError(
                    f"output {self.output_points[j].name!r} fired before the inputs of layer positions {missing}: "
                    "every input hookpoint must come before the outputs it feeds"
                )
            mask = replaced_positions(act, self.keep, self.exclude_first)
            with torch.no_grad():
                y_hat = self.dictionary.decode_layer(
                    j, [self._codes[i] for i in range(j + 1)], self._inputs[j], self._contributions
                )
            if self.mode != "splice" and mask is not None:
                y_hat = y_hat[mask.reshape(-1)]
            y = act.reshape(-1, act.shape[-1]) if mask is None else act[mask]
            y_hat = y_hat.float()
            if self.error_term:
                y_hat = y_hat + (y.float() - y_hat)
            if mask is None:
                return y_hat.reshape(act.shape).to(act)
            out = act.clone()
            out[mask] = y_hat.to(act)
            return out

        return fn

    def __enter__(self) -> LayeredAttachment:
        stack = contextlib.ExitStack()
        try:
            for i in range(self.n_read):
                stack.enter_context(hooks.replace(self.model, self.input_points[i], self._input_fn(i)))
            for j in self.replaced:
                stack.enter_context(hooks.replace(self.model, self.output_points[j], self._output_fn(j)))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        self._codes.clear()
        self._inputs.clear()
