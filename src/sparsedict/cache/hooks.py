"""Hookpoints: named places in a HF causal LM whose activations we read or replace.

A hookpoint is a module path plus a side: ``model.layers.6`` (output of block 6, the residual stream),
``model.layers.6.mlp:in`` (first input of the MLP). Friendly aliases resolve per model family:

=============  =================================  ========================  ==========================
alias          Llama / SmolLM / Qwen2 / Gemma      GPT-2 (``transformer.h``)  GPT-NeoX / Pythia
=============  =================================  ========================  ==========================
resid_pre.L    layers.L:in                        h.L:in                    layers.L:in
resid_post.L   layers.L                           h.L                       layers.L
attn_out.L     layers.L.self_attn (*)             h.L.attn                  layers.L.attention
attn_z.L       layers.L.self_attn.o_proj:in       h.L.attn.c_proj:in        layers.L.attention.dense:in
mlp_in.L       layers.L.mlp:in                    h.L.mlp:in (= ln_2 out)   layers.L.mlp:in
mlp_hidden.L   layers.L.mlp.down_proj:in          h.L.mlp.c_proj:in         layers.L.mlp.dense_4h_to_h:in
mlp_out.L      layers.L.mlp (*)                   h.L.mlp                   layers.L.mlp
=============  =================================  ========================  ==========================

(*) Gemma 2/3 normalise the sublayer outputs before adding them to the residual; there ``attn_out`` is
``post_attention_layernorm`` and ``mlp_out`` is ``post_feedforward_layernorm`` (the residual
contributions). ``mlp_hidden`` of gated MLPs is act(gate)·up, the input of ``down_proj``, not
``act_fn``'s output. Tuple outputs are handled (element 0 is the activation).

Attention z per head: ``attn_z.L`` is the merged ``[B, T, n_heads·d_head]`` input of the output
projection (TransformerLens' ``hook_z`` flattened, as SAELens' ``reshape_activations: hook_z`` trains
on). A ``.h<k>`` suffix (``attn_z.6.h3``, or on the raw path ``model.layers.6.self_attn.o_proj:in.h3``)
names head k's slice ``[B, T, d_head]`` (SAELens' ``hook_head_index``): ``record`` returns the slice and
``replace`` swaps only that head, so per-head dictionaries cache, train, splice and evaluate like any
other. ``n_heads`` is the config's ``num_attention_heads`` and ``d_head`` its ``head_dim`` (else
``hidden_size // n_heads``), checked against the projection's input width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from sparsedict.util import did_you_mean

_LAYER_LISTS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers")
ALIASES = ("resid_pre", "resid_post", "attn_out", "attn_z", "mlp_in", "mlp_hidden", "mlp_out")


class HookpointError(KeyError):
    """Unknown or unusable hookpoint name."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: ``name`` as given, the module path, the side and the block index."""

    name: str
    """Name as given by the user (alias or raw path)."""
    module_path: str
    """Dotted path of the module in ``model.named_modules()``."""
    side: str
    """"out" (module output, element 0 of a tuple) or "in" (first input of the module)."""
    layer: int | None
    """Block index when the module sits in a block, else None."""
    head: int | None = None
    """Attention head whose slice of attention z this names (``.h<k>`` suffix), else None (all features)."""
    n_heads: int | None = None
    """Number of attention heads of attention z when ``head`` is set."""
    d_head: int | None = None
    """Width of one head of attention z when ``head`` is set."""

    @property
    def path(self) -> str:
        """Canonical raw name: ``module_path`` plus ``:in`` for inputs (plus ``.h<k>`` for a head)."""
        return (
            self.module_path
            + (":in" if self.side == "in" else "")
            + (f".h{self.head}" if self.head is not None else "")
        )


def split_head(name: str) -> tuple[str, int | None]:
    """``"attn_z.6.h3"`` -> ``("attn_z.6", 3)``; a name without a ``.h<k>`` suffix -> ``(name, None)``."""
    match = re.fullmatch(r"(.+)\.h(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def at_layer(name: str, layer: int) -> str:
    """``name`` at block ``layer``: an alias kind gets the layer appended (``mlp_in`` -> ``mlp_in.3``), a template
    has ``{layer}`` filled in (``model.layers.{layer}.mlp:in`` -> ``model.layers.3.mlp:in``)."""
    if "{layer}" in name:
        return name.replace("{layer}", str(layer))
    if name in ALIASES:
        return f"{name}.{layer}"
    raise HookpointError(
        f"hookpoint {name!r} of a multi-layer dictionary must be an alias kind ({', '.join(ALIASES)}) or a "
        "template holding '{layer}' (e.g. 'model.layers.{layer}.mlp:in')"
    )


def head_layout(model: nn.Module, hp: Hookpoint) -> tuple[int, int] | None:
    """``(n_heads, d_head)`` when ``hp`` is attention z (all heads) of its block, else None."""
    if hp.layer is None or hp.side != "in" or hp.head is not None:
        return None
    try:
        if _alias_path(model, "attn_z", hp.layer) != hp.path:
            return None
    except HookpointError:
        return None
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_attention_heads", None)
    if not n:
        return None
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n
    module = model.get_submodule(hp.module_path)
    width = getattr(module, "in_features", None)  # nn.Linear; GPT-2's Conv1D has weight [in, out]
    if width is None and getattr(module, "weight", None) is not None and hasattr(module, "nf"):
        width = module.weight.shape[0]
    return (int(n), int(d_head)) if width is None or width == n * d_head else None


def _layers_prefix(model: nn.Module) -> str:
    modules = dict(model.named_modules())
    for prefix in _LAYER_LISTS:
        if isinstance(modules.get(prefix), nn.ModuleList):
            return prefix
    raise HookpointError(
        f"cannot find the list of transformer blocks in {type(model).__name__} (looked for "
        f"{', '.join(_LAYER_LISTS)}); use raw module paths such as 'model.layers.6' or 'x.y:in'"
    )


def _alias_path(model: nn.Module, kind: str, layer: int) -> str:
    """Raw path (``module[:in]``) of alias ``kind.layer`` for ``model``'s family."""
    prefix = _layers_prefix(model)
    block = f"{prefix}.{layer}"
    modules = dict(model.named_modules())
    if block not in modules:
        n = len(modules[prefix])
        raise HookpointError(
            f"layer {layer} out of range: {type(model).__name__} has {n} blocks (0..{n - 1})"
        )
    if prefix == "transformer.h":  # GPT-2
        table = {"attn_out": "attn", "attn_z": "attn.c_proj:in", "mlp_in": "mlp:in",
                 "mlp_hidden": "mlp.c_proj:in", "mlp_out": "mlp"}  # fmt: skip
    elif prefix == "gpt_neox.layers":
        table = {"attn_out": "attention", "attn_z": "attention.dense:in", "mlp_in": "mlp:in",
                 "mlp_hidden": "mlp.dense_4h_to_h:in", "mlp_out": "mlp"}  # fmt: skip
    else:  # Llama, SmolLM, Mistral, Qwen2, Gemma
        sandwich = f"{block}.pre_feedforward_layernorm" in modules  # Gemma 2/3 norm sublayer outputs
        table = {
            "attn_out": "post_attention_layernorm" if sandwich else "self_attn",
            "attn_z": "self_attn.o_proj:in",
            "mlp_in": "mlp:in",
            "mlp_hidden": "mlp.down_proj:in",
            "mlp_out": "post_feedforward_layernorm" if sandwich else "mlp",
        }
    table.update(resid_pre=":in", resid_post="")
    sub = table[kind]
    return block + sub if sub.startswith(":") or not sub else f"{block}.{sub}"


def available(model: nn.Module) -> list[str]:
    """Valid hookpoint names: every alias for every block, then every raw module path (``:in`` too)."""
    names: list[str] = []
    with contextlib.suppress(HookpointError):
        n = len(dict(model.named_modules())[_layers_prefix(model)])
        names += [f"{kind}.{i}" for kind in ALIASES for i in range(n)]
    for path, _ in model.named_modules():
        if path:
            names += [path, f"{path}:in"]
    return names


def resolve(model: nn.Module, name: str) -> Hookpoint:
    """Resolve an alias (``resid_post.6``) or raw path (``model.layers.6.mlp:in``) to a :class:`Hookpoint`.

    A raw path relative to the base model (sparsify's ``layers.6`` for ``model.layers.6``) resolves too; the
    hookpoint keeps the name as given.
    """
    try:
        return _resolve(model, name)
    except HookpointError:
        prefix = getattr(model, "base_model_prefix", "")
        if prefix and not name.startswith(prefix + "."):
            with contextlib.suppress(HookpointError):
                return dataclasses.replace(_resolve(model, f"{prefix}.{name}"), name=name)
        raise


def _resolve(model: nn.Module, name: str) -> Hookpoint:
    base, head = split_head(name)
    if head is not None and name not in dict(model.named_modules()):
        hp = _resolve(model, base)
        layout = head_layout(model, hp)
        if layout is None:
            raise HookpointError(
                f"hookpoint {name!r}: a '.h<k>' head suffix only applies to attention z (attn_z.L, the input of "
                f"the attention output projection), but {base!r} is {hp.path}"
            )
        if not 0 <= head < layout[0]:
            raise HookpointError(
                f"hookpoint {name!r}: head {head} out of range ({layout[0]} heads, 0..{layout[0] - 1})"
            )
        return dataclasses.replace(hp, name=name, head=head, n_heads=layout[0], d_head=layout[1])
    raw = name
    match = re.fullmatch(r"([a-z_]+)\.(\d+)", name)
    if match and match.group(1) in ALIASES:
        raw = _alias_path(model, match.group(1), int(match.group(2)))
    path, _, side = raw.partition(":")
    side = side or "out"
    modules = dict(model.named_modules())
    if side not in ("in", "out") or path not in modules or not path:
        valid = available(model)
        aliases = ", ".join(f"{a}.L" for a in ALIASES)
        raise HookpointError(
            f"unknown hookpoint {name!r} for {type(model).__name__}{did_you_mean(name, valid, n=3) or '.'} Use an "
            f"alias ({aliases}) or a raw module path with optional ':in'/':out'. Valid names include: {', '.join(valid[:40])} ... "
            f"(all {len(valid)} from sparsedict.cache.hooks.available(model))"
        )
    layer = None
    for prefix in _LAYER_LISTS:
        m = re.match(re.escape(prefix) + r"\.(\d+)(\.|$)", path)
        if m:
            layer = int(m.group(1))
    return Hookpoint(name=name, module_path=path, side=side, layer=layer)


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for value in kwargs.values():
        if isinstance(value, torch.Tensor):
            return value
    raise HookpointError("the hooked module received no tensor input")


class _StopForward(Exception):
    """Raised from a hook once every requested activation is captured, to skip the rest of the model."""


def _attach(model: nn.Module, hp: Hookpoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register a hook calling ``fn(act)``; a tensor returned by ``fn`` replaces the activation.

    For a head hookpoint ``fn`` sees (and may replace) only that head's slice ``[..., d_head]``.
    """
    module = model.get_submodule(hp.module_path)
    if hp.head is not None:
        fn = _on_head(hp, fn)
    if hp.side == "in":

        def pre_hook(_mod, args, kwargs):
            x = _first_tensor(args, kwargs)
            new = fn(x)
            if new is None:
                return None
            if args and args[0] is x:
                return (new, *args[1:]), kwargs
            key = next(k for k, v in kwargs.items() if v is x)
            return args, {**kwargs, key: new}

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_mod, _args, output):
        x = output[0] if isinstance(output, tuple) else output
        new = fn(x)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def _on_head(hp: Hookpoint, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Wrap ``fn`` to act on head ``hp.head`` of a merged ``[..., n_heads·d_head]`` activation."""

    def on_head(x: torch.Tensor) -> torch.Tensor | None:
        heads = x.unflatten(-1, (hp.n_heads, hp.d_head))
        new = fn(heads[..., hp.head, :])
        if new is None:
            return None
        out = heads.clone()
        out[..., hp.head, :] = new
        return out.flatten(-2)

    return on_head


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def record(
    model: nn.Module,
    hookpoints: list[str | Hookpoint],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stop_after: bool = True,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``input_ids [B, T]`` and return ``{name: activation [B, T, d]}``.

    With ``stop_after`` the forward is cut (by an exception raised from the hook) as soon as every
    hookpoint has fired, so blocks after the deepest one and the LM head never run.
    """
    hps = [h if isinstance(h, Hookpoint) else resolve(model, h) for h in hookpoints]
    acts: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            acts[name] = x.detach()
            if stop_after and len(acts) == len(hps):
                raise _StopForward

        return fn

    handles = [_attach(model, hp, capture(hp.name)) for hp in hps]
    with _hooks(handles), torch.inference_mode(), contextlib.suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    missing = [hp.name for hp in hps if hp.name not in acts]
    if missing:
        raise HookpointError(f"hookpoints {missing} never fired during the forward; is the module used?")
    return acts


@contextlib.contextmanager
def replace(model: nn.Module, hookpoint: str | Hookpoint, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Within the block, the activation ``act [B, T, d]`` at ``hookpoint`` becomes ``fn(act)`` (same shape)."""
    hp = hookpoint if isinstance(hookpoint, Hookpoint) else resolve(model, hookpoint)

    def swap(x: torch.Tensor) -> torch.Tensor:
        new = fn(x)
        if new.shape != x.shape:
            raise ValueError(
                f"replace({hp.name!r}): fn returned shape {tuple(new.shape)}, expected {tuple(x.shape)}"
            )
        return new.to(x.dtype)

    with _hooks([_attach(model, hp, swap)]):
        yield hp
