"""Helpers every checkpoint reader shares: the error type, dtype names, name/shape checks, building the
registered architecture a checkpoint maps to, and TransformerLens hook names.

Readers never import the architectures: the loader that calls them passes the registry (anything with
``lookup``/``build``/``available``, :data:`sparsedict.dictionaries.ARCHITECTURES`), so this package sits
below :mod:`sparsedict.dictionaries` and ``Dictionary.from_pretrained`` can call down into it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from sparsedict.config import from_dict


class FormatError(ValueError):
    """A checkpoint directory that cannot be read: unknown layout, missing/mis-shaped tensors, bad config."""


class Architectures(Protocol):
    """The registry a reader builds dictionaries from (:class:`sparsedict.dictionaries.base.Registry`)."""

    def lookup(self, name: str) -> tuple[type[nn.Module], type]: ...

    def build(self, cfg: Any) -> nn.Module: ...

    def available(self) -> list[str]: ...

    def build_set(self, cfg: Any, members: dict[int, nn.Module]) -> nn.Module: ...


def parse_dtype(name: Any, where: str) -> str:
    """``"torch.float32"`` / ``"float32"`` / ``"fp32"`` / a torch dtype -> our dtype string (``"float32"``)."""
    if isinstance(name, torch.dtype):
        return str(name).removeprefix("torch.")
    text = str(name or "float32").removeprefix("torch.")
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
    }
    text = aliases.get(text, text)
    if text not in ("float32", "float16", "bfloat16", "float64"):
        raise FormatError(
            f"{where}: unsupported dtype {name!r} (expected float32, float16, bfloat16 or float64)"
        )
    return text


def require(tensors: dict[str, Tensor], names: list[str], where: str) -> None:
    """Raise naming the missing tensors (and those present) when any of ``names`` is absent."""
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FormatError(
            f"{where}: missing tensors {missing}; the file holds {sorted(tensors)}. "
            "The checkpoint is incomplete or not of the architecture its config declares."
        )


def set_threshold(state: dict[str, Tensor], expected: dict[str, Tensor], theta: Tensor, n: int) -> None:
    """Store a per-latent threshold ``θ [n]`` under whatever name the target architecture uses."""
    theta = theta.reshape(-1).expand(n) if theta.numel() == 1 else theta
    if "threshold" in expected:
        shape = expected["threshold"].shape
        state["threshold"] = (
            theta.reshape(shape) if theta.numel() == math.prod(shape) else theta[:1].reshape(shape)
        )
    else:
        raise FormatError(
            f"the target architecture has no threshold parameter (state keys: {sorted(expected)})"
        )


def build_dictionary(registry: Architectures, arch: str, fields: dict[str, Any], where: str):
    """Instantiate registered architecture ``arch`` with config ``fields`` (unknown fields are an error)."""
    try:
        _, cfg_cls = registry.lookup(arch)
    except KeyError as err:
        raise FormatError(
            f"{where}: needs our architecture {arch!r}, which is not available ({err})"
        ) from err
    known = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise FormatError(f"{where}: architecture {arch!r} has no config fields {unknown}")
    cfg = from_dict(cfg_cls, {**fields, "architecture": arch})
    return registry.build(cfg)


def load_state(model, state: dict[str, Tensor], where: str, meta: dict[str, Any], config: str = "the config"):
    """Check names/shapes of ``state`` (in our layout) against ``model`` (built from ``config``) and load it."""
    expected = {k: v for k, v in model.state_dict().items() if k != "input_scale"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"{where}: missing tensors {missing}, unexpected tensors {unexpected} for architecture "
            f"{model.architecture!r}: the checkpoint is incomplete or not of the architecture its config declares"
        )
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise FormatError(
                f"{where}: tensor {name} has shape {list(t.shape)} but {config} implies {list(expected[name].shape)} "
                f"(d_in={model.d_in}, n_latents={model.n_latents}, d_out={model.d_out}): the config and the "
                "weights disagree"
            )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)
    model.meta = meta
    return model


def check_shape(t: Tensor, shape: tuple[int, ...], name: str, where: str, hint: str) -> None:
    """Raise when tensor ``name`` does not have ``shape`` (``hint`` names the config fields)."""
    if tuple(t.shape) != tuple(shape):
        raise FormatError(
            f"{where}: tensor {name} has shape {list(t.shape)} but {hint} implies {list(shape)}: "
            "the config and the weights disagree"
        )


_TL_SITES = {
    "hook_resid_post": "resid_post",
    "hook_resid_pre": "resid_pre",
    "hook_mlp_out": "mlp_out",
    "hook_attn_out": "attn_out",
    "ln2.hook_normalized": "mlp_in",
    "mlp.hook_post": "mlp_hidden",
    "attn.hook_z": "attn_z",
}
_ALIAS_TL = {alias: site for site, alias in _TL_SITES.items()}
_BLOCKS = r"(?:model\.layers|model\.language_model\.layers|transformer\.h|gpt_neox\.layers|layers|h)"

TL_MISMATCH = {
    "mlp_in": "TransformerLens' ln2.hook_normalized is the normalised residual before ln2's weight (and bias), "
    "while this dictionary reads the MLP input after them"
}
"""Aliases whose TransformerLens hook is the closest one but not the same activation."""


def from_transformerlens(name: str, head: int | None = None) -> str:
    """TransformerLens hook name -> our alias (``blocks.6.hook_resid_post`` -> ``resid_post.6``).

    ``head`` (SAELens ``hook_head_index``) selects one head of ``attn.hook_z`` (``attn_z.6.h3``). Unknown names
    are returned unchanged (the original is always kept in ``meta["source_hookpoint"]``).
    """
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _TL_SITES:
        alias = f"{_TL_SITES[parts[2]]}.{parts[1]}"
        return alias if head is None else f"{alias}.h{head}"
    return name


@dataclasses.dataclass(frozen=True)
class TLHook:
    """Where a TransformerLens user finds the activation of one of our hookpoints."""

    hook_name: str
    """TransformerLens hook name (``blocks.6.hook_resid_post``)."""
    head: int | None = None
    """Head of ``attn.hook_z`` (SAELens ``hook_head_index``), None for all of them."""
    caveat: str = ""
    """Non-empty when the TransformerLens activation differs from ours (see :data:`TL_MISMATCH`)."""


def to_transformerlens(name: str) -> TLHook | None:
    """Our hookpoint (alias, ``attn_z.L.h<k>``, or a raw block path) -> its TransformerLens hook, or None.

    Aliases map one to one (``mlp_in`` with a caveat); raw paths map only when they name a whole block
    (``model.layers.6`` -> ``blocks.6.hook_resid_post``, ``model.layers.6:in`` -> ``hook_resid_pre``): a raw path
    inside a block means different modules in different model families.
    """
    match = re.fullmatch(r"([a-z_]+)\.(\d+)(?:\.h(\d+))?", name)
    if match and match.group(1) in _ALIAS_TL:
        kind, layer, head = match.group(1), match.group(2), match.group(3)
        if head is not None and kind != "attn_z":
            return None
        return TLHook(f"blocks.{layer}.{_ALIAS_TL[kind]}", None if head is None else int(head),
                      TL_MISMATCH.get(kind, ""))  # fmt: skip
    match = re.fullmatch(_BLOCKS + r"\.(\d+)(:in)?", name)
    if match:
        return TLHook(f"blocks.{match.group(1)}.hook_resid_{'pre' if match.group(2) else 'post'}")
    return None
