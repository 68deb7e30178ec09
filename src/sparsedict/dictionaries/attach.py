"""Attach a dictionary to a HF causal LM for inference: read its codes and/or splice its reconstruction.

``dictionary.hook(model, mode)`` (= :func:`attach`) returns an :class:`Attachment`, a context manager that, while
open, runs the dictionary on every forward pass at its hookpoint through
:func:`sparsedict.cache.hooks.replace` — the same primitive the evaluator splices with:

- ``mode="codes"``: the model runs unchanged; each forward appends the codes to ``att.codes``;
- ``mode="splice"``: the activation at the target is replaced by the dictionary's output;
- ``mode="both"``: splice and keep the codes.

An SAE reads and writes its ``hookpoint``. A transcoder reads ``hookpoint`` (captured by an identity replace) and
writes ``target``: its output substitutes the target activation of the same forward pass. Activations
``[B, T, d]`` are flattened to ``[B·T, d]`` for the dictionary, cast to its dtype/device, and the result is cast
back; the dictionary computation is the evaluator's (:func:`sparsedict.metrics.reconstruct`, which
honours an unfolded input scale). A width that does not match the dictionary (a checkpoint for another model or hookpoint) raises a clear
error from inside the forward pass.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from sparsedict.cache import hooks
from sparsedict.dictionaries.base import Dictionary, SparseCode

MODES = ("splice", "codes", "both")


def resolve_hookpoint(model: nn.Module, name: str) -> hooks.Hookpoint:
    """Resolve ``name``; names relative to the base model (sparsify's ``layers.6``) get its prefix added."""
    try:
        return hooks.resolve(model, name)
    except hooks.HookpointError:
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and not name.startswith(prefix + "."):
            with contextlib.suppress(hooks.HookpointError):
                return hooks.resolve(model, f"{prefix}.{name}")
        raise


def reconstruct(dictionary: Dictionary, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, SparseCode]:
    """Run ``dictionary`` on activations ``x [..., d_in]`` (target ``y [..., d_out]`` for a transcoder).

    Returns ``(ŷ [..., d_out] in x's dtype and device, code over the N = prod(...) rows)``. The computation is
    the evaluator's (:func:`sparsedict.metrics.reconstruct`): a dictionary still holding an input scale
    c ≠ 1 is fed ``c·x`` and its output divided by c.
    """
    from sparsedict.metrics import reconstruct as eval_reconstruct

    dev = dictionary.W_dec.device
    flat = x.reshape(-1, x.shape[-1]).to(dev)
    flat_y = None if y is None else y.reshape(-1, y.shape[-1]).to(dev)
    out, code = eval_reconstruct(dictionary, flat, flat_y)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(device=x.device, dtype=x.dtype), code


class Attachment:
    """Context manager produced by :func:`attach`; holds the codes of every forward pass while open.

    ``codes[i]`` is the :class:`SparseCode` of forward ``i`` over its ``B·T`` tokens (row ``b·T + t``);
    ``shapes[i] = (B, T)``. :meth:`dense` gives them as ``[B, T, n]``.
    """

    def __init__(
        self, dictionary: Dictionary, model: nn.Module, mode: str = "splice", exclude_first: int = 0
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
        self.exclude_first = int(exclude_first)
        """Positions ``t < exclude_first`` keep the model's own activation when splicing (attention sinks)."""
        self.transcoder = dictionary.cfg.is_transcoder
        self.input_point = resolve_hookpoint(model, dictionary.cfg.hookpoint)
        self.output_point = (
            resolve_hookpoint(model, dictionary.cfg.target) if self.transcoder else self.input_point
        )
        self.codes: list[SparseCode] = []
        self.shapes: list[tuple[int, ...]] = []
        self._stack: contextlib.ExitStack | None = None
        self._pending: Tensor | None = None

    # -- results -------------------------------------------------------------------------------------
    @property
    def last(self) -> SparseCode:
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
                f"{getattr(self.dictionary, 'meta', {}).get('model') or 'not recorded'})"
            )

    def _run(self, x: Tensor, target: Tensor) -> Tensor:
        self._check(target, self.dictionary.d_out, "outputs", self.output_point)
        x_hat, code = reconstruct(self.dictionary, x, target if self.transcoder else None)
        if self.mode != "splice":
            self.codes.append(SparseCode(code.values.detach(), _detach(code.indices), code.n_latents))
            self.shapes.append(tuple(x.shape[:-1]))
        if self.mode == "codes":
            return target
        if self.exclude_first > 0 and x_hat.ndim == 3:
            x_hat = x_hat.clone()
            x_hat[:, : self.exclude_first] = target[:, : self.exclude_first]
        return x_hat

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


def _detach(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def attach(
    dictionary: Dictionary, model: nn.Module, mode: str = "splice", exclude_first: int = 0
) -> Attachment:
    """Context manager attaching ``dictionary`` to ``model`` (see module docstring for the modes)."""
    return Attachment(dictionary, model, mode, exclude_first)


@torch.no_grad()
def spliced_logits(dictionary: Dictionary, model: nn.Module, input_ids: Tensor, **kwargs: Any) -> Tensor:
    """Logits ``[B, T, vocab]`` of ``model`` with the dictionary spliced in (no gradient)."""
    with attach(dictionary, model, "splice"):
        return model(input_ids=input_ids, use_cache=False, **kwargs).logits
