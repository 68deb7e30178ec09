"""The Dictionary interface, the sparse code it produces, and the architecture registry.

Canonical layout (= SAELens): ``W_enc [d_in, n]``, ``b_enc [n]``, ``W_dec [n, d_out]`` (row i is latent i's
direction), ``b_dec [d_out]``, optional ``W_skip [d_out, d_in]`` (skip transcoder). A transcoder is any
dictionary whose ``target`` hookpoint differs from its ``hookpoint``; there is no separate class hierarchy.

Every architecture is one module in this package that subclasses :class:`Dictionary`, declares its own
config dataclass (a subclass of :class:`DictionaryConfig` whose ``architecture`` defaults to the name) and
registers both with ``@register("name", NameConfig)``. What an architecture can do is declared on its class
(``supports_transcoder``, ``supports_latent_sharding``, ``fused_decoder_update``, ``input_normalisation``,
``saelens_architecture``, ``sparsity_fields``, ...): the trainer, the formats and the generic tests read these
instead of probing. Gradient-trained dictionaries return their loss terms in ``Output.losses`` (already
weighted; the trainer sums them). Dictionaries with their own solver (SNMF) set ``trains_by_gradient = False``
and implement ``fit_step(x, y) -> Output``; the trainer's data loop, metrics, checkpoints and logging are the
same for both.

``save_pretrained``/``from_pretrained``/``push_to_hub``/``hook`` call down into :mod:`sparsedict.formats`,
:mod:`sparsedict.hub` and :mod:`sparsedict.dictionaries.attach`, which never import this package: the
registry is handed to the loaders.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sparsedict import hub
from sparsedict.cache.hooks import at_layer
from sparsedict.dictionaries.attach import Attachment
from sparsedict.formats import load_dir, native
from sparsedict.kernels import sparse_decode
from sparsedict.metrics import ReconstructionStats
from sparsedict.util import did_you_mean


@dataclass
class DictionaryConfig:
    """Fields shared by every architecture. Architecture configs subclass this and add their own."""

    architecture: str = "topk"
    """Registered architecture name (see ``sparsedict.dictionaries.available()``)."""
    hookpoint: str = ""
    """Input hookpoint (alias like ``resid_post.6`` or module path like ``model.layers.6``)."""
    target: str = ""
    """Target hookpoint for a transcoder; empty means the dictionary reconstructs its input (an SAE)."""
    layers: list[int] = field(default_factory=list)
    """Blocks of a multi-layer dictionary: ``hookpoint`` and ``target`` are then alias kinds (``mlp_in``,
    ``mlp_out``) or templates holding ``{layer}``, named per layer. A ``clt`` spans the (contiguous) range;
    any other architecture becomes a transcoder set, one dictionary per layer. Empty: one hookpoint."""
    d_in: int = 0
    """Input dimension; 0 means 'take it from the activation cache'."""
    d_out: int = 0
    """Target dimension; 0 means equal to d_in (or taken from the target hookpoint in the cache)."""
    n_latents: int = 0
    """Number of latents; 0 means ``expansion * d_in``."""
    expansion: int = 8
    """Width as a multiple of d_in, used when n_latents is 0."""
    skip: bool = False
    """Add a linear skip connection ``x W_skip^T`` (zero-initialised): a skip transcoder."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (SAEs only; forced off for transcoders)."""
    b_dec_init: str = "median"
    """How to initialise b_dec from a data sample: 'median' (geometric median), 'mean' or 'zero'."""
    dtype: str = "float32"
    """Parameter dtype (master weights; compute may use autocast)."""
    name: str = ""
    """Name of this dictionary inside a run (defaults to architecture + hookpoint)."""

    def resolved(self, d_in: int, d_out: int | None = None) -> DictionaryConfig:
        """Return a copy with d_in, d_out and n_latents filled in from the data."""
        d_in = self.d_in or d_in
        d_out = self.d_out or (d_out if d_out is not None else d_in)
        n = self.n_latents or self.expansion * d_in
        if self.d_in and self.d_in != d_in:
            raise ValueError(
                f"config says d_in={self.d_in} but the data has d={d_in}: fix d_in or the hookpoint"
            )
        return dataclasses.replace(self, d_in=d_in, d_out=d_out, n_latents=n)

    @property
    def is_transcoder(self) -> bool:
        return bool(self.target) and self.target != self.hookpoint

    @property
    def hookpoints(self) -> list[str]:
        """The input hookpoint of every layer (``[hookpoint]`` without ``layers``)."""
        return [at_layer(self.hookpoint, layer) for layer in self.layers] if self.layers else [self.hookpoint]

    @property
    def targets(self) -> list[str]:
        """The target hookpoint of every layer (the inputs for an SAE)."""
        if not self.is_transcoder:
            return self.hookpoints
        return [at_layer(self.target, layer) for layer in self.layers] if self.layers else [self.target]

    @property
    def source_key(self) -> tuple[Any, Any]:
        """``(hookpoint, target)`` of the data this dictionary reads (target ``""`` for an SAE); with ``layers``,
        tuples of the per-layer names (a source serving ``[B, L, d]`` batches)."""
        if self.layers:
            return (tuple(self.hookpoints), tuple(self.targets) if self.is_transcoder else "")
        return (self.hookpoint, self.target if self.is_transcoder else "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SparseCode:
    """A batch of codes: k-sparse (``values``/``indices`` ``[B, k]``) or dense (``values [B, n]``, no indices).

    Zero entries in a k-sparse code are allowed (they count as inactive in L0).
    """

    values: Tensor
    indices: Tensor | None
    n_latents: int

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None

    def to_dense(self) -> Tensor:
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[0], self.n_latents)
        return out.scatter_add_(1, self.indices, self.values)

    def active(self) -> Tensor:
        """Boolean ``[B, n]``-free summary: per-latent count of nonzero activations in this batch ``[n]``."""
        if self.indices is None:
            return (self.values != 0).sum(0)
        counts = torch.zeros(self.n_latents, dtype=torch.long, device=self.values.device)
        return counts.index_add_(0, self.indices.flatten(), (self.values != 0).flatten().long())

    def l0(self) -> Tensor:
        """Number of nonzero latents per token ``[B]``."""
        return (self.values != 0).sum(-1)


@dataclass
class Output:
    """What ``Dictionary.forward`` returns."""

    x_hat: Tensor
    """Reconstruction of the target ``[B, d_out]``."""
    code: SparseCode
    losses: dict[str, Tensor] = field(default_factory=dict)
    """Weighted loss terms; the trainer minimises their sum."""
    logs: dict[str, Tensor] = field(default_factory=dict)
    """Values the trainer logs beside the losses without minimising them (an unweighted ``mse`` where the loss
    weights it); a key here replaces the loss term of the same name in the logs."""


class Registry:
    """Architecture name -> (Dictionary subclass, its config class); the one list of architectures."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[type[Dictionary], type[DictionaryConfig]]] = {}
        self._set_class: type[nn.Module] | None = None

    def register_set(self, cls: type[nn.Module]) -> type[nn.Module]:
        """Class decorator: the container of per-layer dictionaries that :meth:`build_set` makes."""
        self._set_class = cls
        return cls

    def build_set(self, cfg: DictionaryConfig, members: dict[int, Dictionary]) -> nn.Module:
        """A transcoder set of ``members`` (layer -> dictionary) described by ``cfg`` (with its ``layers``)."""
        if self._set_class is None:
            raise RuntimeError("no transcoder set class is registered (import sparsedict.dictionaries)")
        return self._set_class(cfg, members)

    def register(self, name: str, config_cls: type[DictionaryConfig]):
        """Class decorator: make an architecture available under ``name`` with its config class.

        ``config_cls.architecture`` must default to ``name`` (``build`` dispatches on it), so a config copied
        from another architecture cannot silently build that one.
        """

        def wrap(cls: type[Dictionary]) -> type[Dictionary]:
            if name in self._entries:
                raise ValueError(f"architecture {name!r} is registered twice")
            default = {f.name: f.default for f in dataclasses.fields(config_cls)}.get("architecture")
            if default != name:
                raise ValueError(
                    f"{config_cls.__name__}.architecture defaults to {default!r} but {cls.__name__} is registered "
                    f"as {name!r}: declare `architecture: str = {name!r}` in {config_cls.__name__}"
                )
            self._entries[name] = (cls, config_cls)
            cls.architecture = name
            cls.config_class = config_cls
            return cls

        return wrap

    def available(self) -> list[str]:
        return sorted(self._entries)

    def lookup(self, name: str) -> tuple[type[Dictionary], type[DictionaryConfig]]:
        if name not in self._entries:
            raise KeyError(
                f"unknown architecture {name!r}{did_you_mean(name, self._entries) or '.'} "
                f"Registered: {', '.join(self.available())}"
            )
        return self._entries[name]

    def build(self, cfg: DictionaryConfig) -> Dictionary:
        """Instantiate the registered class for ``cfg.architecture`` (cfg must be resolved: d_in, n set)."""
        cls, _ = self.lookup(cfg.architecture)
        if not cfg.d_in or not cfg.n_latents:
            raise ValueError("build() needs a resolved config: call cfg.resolved(d_in) first")
        return cls(cfg)


ARCHITECTURES = Registry()
"""Every registered architecture (each module of this package registers its own on import)."""
register = ARCHITECTURES.register
available = ARCHITECTURES.available
lookup = ARCHITECTURES.lookup
build = ARCHITECTURES.build


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on the rows of ``x [N, d]`` (in fp64), returns ``[d]``."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * (1 + y.norm()):
            y = y_new
            break
        y = y_new
    return y


class LayerRange:
    """``layers`` and ``n_layers`` of a model over the contiguous layer range its ``cfg.layers`` names."""

    cfg: DictionaryConfig

    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    @property
    def n_layers(self) -> int:
        return len(self.cfg.layers)


class Dictionary(nn.Module):
    """Base class: parameters in the canonical layout, encode/decode/forward, decoder normalisation.

    Capabilities are class attributes an architecture overrides (the trainer, the formats and the generic
    tests read them; nothing probes with ``getattr``). Architectures without the linear encoder
    ``W_enc``/``b_enc`` override :meth:`_init_encoder`.
    """

    architecture: ClassVar[str] = ""
    config_class: ClassVar[type[DictionaryConfig]] = DictionaryConfig
    unit_norm_decoder: ClassVar[bool] = True
    """If True the trainer keeps decoder rows at unit norm (parallel gradient removed, rows renormalised)."""
    fused_decoder_update: ClassVar[bool] = True
    """The unit-norm decoder update is this class's ``remove_parallel_grad`` -> optimiser step ->
    ``normalise_decoder`` of the base class, so the one-pass fused kernel may replace it (Adam, CUDA). An
    architecture that overrides either method sets False."""
    auto_train: ClassVar[dict[str, Any]] = {}
    """Adam preset applied under ``TrainConfig.optimizer='auto'`` (keys: betas, lr_rule, lr_dec_scale,
    warmup_fraction; :func:`sparsedict.train.optim.auto_preset`). Empty: Adam with the width-rule LR."""
    trains_by_gradient: ClassVar[bool] = True
    """False for dictionaries trained by their own solver through ``fit_step``."""
    supports_transcoder: ClassVar[bool] = True
    """The architecture can map a hookpoint to another (a ``target``, d_out ≠ d_in) and take a ``skip``."""
    supports_latent_sharding: ClassVar[bool] = False
    """``TrainConfig.shard_latents`` can split the latents across ranks (:func:`sparsedict.dictionaries.sharded.shard`)."""
    latent_sharded: ClassVar[bool] = False
    """This object is one rank's slice of a dictionary (its gradients are complete, not averaged)."""
    input_normalisation: ClassVar[str] = "none"
    """Input normalisation the config defaults assume ('none', 'sqrt_d', 'unit_msn'); what
    ``TrainConfig.normalise_inputs='auto'`` applies."""
    saelens_architecture: ClassVar[str | None] = None
    """SAELens architecture this one is saved as ('standard', 'topk', 'jumprelu', 'gated'; transcoder and skip
    variants are derived from the config); None: SAELens has no equivalent. An architecture whose inference
    depends on its config overrides :meth:`inference_architecture` instead."""
    sparsity_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields that set the sparsity (shown in the model card and benchmark tables)."""
    layered: ClassVar[bool] = False
    """One dictionary over the layers of ``cfg.layers`` (a cross-layer transcoder): batches ``[B, L, d]``. For
    other architectures a config with ``layers`` describes a transcoder set (one dictionary per layer)."""

    def __init__(self, cfg: DictionaryConfig):
        super().__init__()
        self.cfg = cfg
        self.meta: dict[str, Any] = {}
        """Provenance of a loaded checkpoint (model, hookpoint, training data, metrics, source format)."""
        self._dead_mask: Tensor | None = None
        self.lr_factors: dict[str, float] = {}
        """LR multipliers by parameter name that ``init_from_data`` may set (e.g. for a rescaled encoder); the
        optimiser applies them from the first step (:meth:`~sparsedict.train.optim.DictionaryOptimizer.apply_lr_factors`)
        and keeps them in its checkpointed state."""
        d, n, d_out = cfg.d_in, cfg.n_latents, cfg.d_out or cfg.d_in
        dtype = getattr(torch, cfg.dtype)
        w_dec = torch.randn(n, d_out, dtype=dtype)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self._init_encoder(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        self.W_skip = nn.Parameter(torch.zeros(d_out, d, dtype=dtype)) if cfg.skip else None
        # Input normalisation: the model sees x * input_scale and reconstructs y * input_scale.
        self.register_buffer("input_scale", torch.ones((), dtype=torch.float32))

    def _init_encoder(self, w_dec: Tensor, bias: bool = True) -> None:
        """Allocate ``W_enc [d_in, n]`` = W_dec^T (a copy, not tied; random for d_out ≠ d_in) and ``b_enc = 0``
        (``bias=False``: no b_enc parameter)."""
        d, n, dtype = self.cfg.d_in, self.cfg.n_latents, w_dec.dtype
        w_enc = w_dec.T.clone() if w_dec.shape[1] == d else torch.randn(d, n, dtype=dtype) / d**0.5
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.register_parameter("b_enc", nn.Parameter(torch.zeros(n, dtype=dtype)) if bias else None)

    def inference_architecture(self) -> str | None:
        """The SAELens architecture that computes what this dictionary computes in eval mode (the class's
        ``saelens_architecture``)."""
        return type(self).saelens_architecture

    # -- shapes ----------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out or self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def subtracts_b_dec(self) -> bool:
        return self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder and self.d_out == self.d_in

    def check_input(self, x: Tensor, what: str = "input", dim: int | None = None) -> None:
        dim = self.d_in if dim is None else dim
        if x.ndim != 2 or x.shape[-1] != dim:
            raise ValueError(
                f"{type(self).__name__} expects {what} of shape [batch, {dim}] but got {list(x.shape)}: "
                f"this dictionary was trained on hookpoint {self.cfg.hookpoint!r} with d={dim}"
            )

    # -- the forward pass --------------------------------------------------------------------------
    def _x_in(self, x: Tensor) -> Tensor:
        """The encoder's input: ``x − b_dec`` where the dictionary subtracts b_dec, else ``x``."""
        return x - self.b_dec if self.subtracts_b_dec else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense encoder pre-activations ``[B, n]`` (used by dense architectures and AuxK)."""
        return self._x_in(x) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> SparseCode:
        raise NotImplementedError

    def decode(self, code: SparseCode, x: Tensor | None = None) -> Tensor:
        """``x̂ = code · W_dec + b_dec`` (+ ``x W_skip^T`` when a skip connection exists and x is given)."""
        if code.indices is None:
            out = code.values @ self.W_dec + self.b_dec
        else:
            out = sparse_decode(code.indices, code.values, self.W_dec, self.b_dec)
        if self.W_skip is not None and x is not None:
            out = out + x @ self.W_skip.T
        return out

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        self.check_input(x)
        y = x if target is None else target
        code = self.encode(x)
        x_hat = self.decode(code, x)
        losses = {"mse": mse_loss(x_hat, y)}
        losses.update(self.aux_losses(x, y, code, x_hat))
        return Output(x_hat, code, losses)

    def aux_losses(self, x: Tensor, y: Tensor, code: SparseCode, x_hat: Tensor) -> dict[str, Tensor]:
        """Architecture-specific loss terms (sparsity penalties, AuxK, ...), already weighted."""
        return {}

    # -- training hooks (no-ops unless an architecture needs them) -------------------------------------
    def on_step(self, step: int, total_steps: int) -> None:
        """Called by the trainer before each step (coefficient warmups, threshold schedules)."""

    def after_step(self, out: Output) -> None:
        """Called by the trainer after each optimiser step with that step's output (threshold estimates)."""

    @property
    def calibrates(self) -> bool:
        """Whether :meth:`calibrate` sets something from data at the end of a run (a firing threshold chosen for
        a target L0), so the trainer holds rows out of training for it when the run repeats its rows."""
        return False

    def calibrate(self, batches: list[Tensor]) -> None:
        """Set at the end of a run what :attr:`calibrates` names, from ``batches`` of inputs (input-scaled) that
        the run did not train on: rows already trained on fire fewer latents than new rows."""

    def train_state(self) -> dict[str, Any]:
        """Python-side training state a checkpoint must restore for an exact resume (a steered coefficient);
        tensors and JSON values only. Empty unless an architecture keeps such state."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`train_state` returned."""

    def set_dead_mask(self, dead: Tensor | None) -> None:
        """The trainer hands over the current dead-latent mask ``[n]`` (for AuxK)."""
        self._dead_mask = dead

    def fit_step(self, x: Tensor, y: Tensor | None = None) -> Output:
        """One solver step (``trains_by_gradient = False``): returns this batch's output before the update."""
        raise NotImplementedError(f"{type(self).__name__} is trained by gradient, not by fit_step")

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """Initialise biases from a data sample (``x`` already normalised by ``input_scale``); for a transcoder
        also the encoder's scale (:meth:`match_encoder_scale`)."""
        y = x if y is None else y
        how = self.cfg.b_dec_init
        if how == "median":
            self.b_dec.copy_(geometric_median(y).to(self.b_dec.dtype))
        elif how == "mean":
            self.b_dec.copy_(y.double().mean(0).to(self.b_dec.dtype))
        elif how != "zero":
            raise ValueError(f"b_dec_init must be 'median', 'mean' or 'zero', not {how!r}")
        if self.cfg.is_transcoder:
            self.match_encoder_scale(x, y)

    @torch.no_grad()
    def match_encoder_scale(self, x: Tensor, y: Tensor) -> None:
        """Scale ``W_enc`` by ``rms‖y − b_dec‖ / rms‖x_in‖`` so that the first codes are in the target's units.

        An SAE's encoder starts as its decoder's transpose, so a latent's first activation is the projection of
        the input on its unit decoder direction: the size that direction needs in the reconstruction. A
        transcoder's random encoder gives activations on the input's scale, and its input and target can differ
        by an order of magnitude (a normalised MLP input against the MLP output); the encoder then has to grow
        by that factor during training, and most latents stop firing while it does (dead latents, which
        the AuxK loss does not bring back). Matching the scale at the start avoids that (measured:
        benchmarks/RESULTS.md).
        """
        target = (y - self.b_dec).float().pow(2).sum(-1).mean().sqrt()
        source = self._x_in(x).float().pow(2).sum(-1).mean().sqrt()
        if float(source) > 0 and float(target) > 0:
            self.W_enc.mul_((target / source).to(self.W_enc.dtype))

    # -- decoder normalisation ----------------------------------------------------------------------
    @torch.no_grad()
    def normalise_decoder(self, eps: float = 1e-8) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each decoder row's gradient parallel to that row."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / (self.W_dec.norm(dim=1, keepdim=True) + 1e-8)
        g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold ``input_scale`` c into the weights so the dictionary works on raw activations.

        Trained on ``c·x``, the model computes ``x̂ = f(c·x)/c``. With ``W_enc *= c``, ``W_dec /= c`` and
        ``b_dec /= c`` it computes the same ``x̂`` from raw ``x`` with unchanged latent magnitudes.
        """
        c = float(self.input_scale)
        if c == 1.0:
            return
        self.W_enc.mul_(c)
        self.W_dec.div_(c)
        self.b_dec.div_(c)
        self.fold_extra(c)
        self.input_scale.fill_(1.0)

    def fold_extra(self, c: float) -> None:
        """Architectures with extra parameters in activation units fold them here."""

    def new_stats(self) -> ReconstructionStats:
        """Empty statistics of this dictionary's reconstructions (what the trainer logs and eval reports)."""
        return ReconstructionStats(self.n_latents)

    # -- persistence and use inside a model (implemented below this package: formats, hub, attach) ----------
    def save_pretrained(self, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                        model_card: bool = True) -> Path:  # fmt: skip
        """Write ``config.json`` + ``model.safetensors`` (input scale folded in) + a ``README.md`` model card."""
        return native.save(self, path, meta, model_card)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, subfolder: str | None = None,
                        revision: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> Dictionary:  # fmt: skip
        """Load a dictionary from a local directory or an HF hub repo id, in any supported format.

        ``subfolder`` picks one dictionary inside a directory/repo holding several (a sparsify run, a SAELens
        release); ``revision`` a hub branch, tag or commit. The format is detected from the files
        (:func:`sparsedict.formats.detect_format`); the architecture is the checkpoint's, whichever class this
        is called on. Weights come back on ``device`` in ``dtype`` (default: the checkpoint's), in eval mode.
        """
        return load_dir(
            hub.resolve(path_or_repo_id, subfolder, revision), ARCHITECTURES, device, dtype, hub.fetch_uri
        )

    def push_to_hub(self, repo_id: str, meta: dict[str, Any] | None = None, **kwargs: Any) -> str:
        """Save and upload to hub repo ``repo_id`` (see :func:`sparsedict.hub.push_to_hub`); returns the commit URL."""
        return hub.push_to_hub(self, repo_id, meta, **kwargs)

    def hook(self, model: nn.Module, mode: str = "splice", exclude_first: int | None = None) -> Attachment:
        """Context manager attaching this dictionary to ``model``: mode 'splice', 'codes' or 'both'.

        Splices the positions the dictionary was trained on (its recorded exclusion rules; all when none are
        recorded) or, with ``exclude_first=n``, the positions ``t >= n``; in eval mode while attached.
        """
        return Attachment(self, model, mode, exclude_first)


def from_pretrained(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Dictionary:  # fmt: skip
    """:meth:`Dictionary.from_pretrained` as a function (``sparsedict.from_pretrained``)."""
    return Dictionary.from_pretrained(path_or_repo_id, subfolder, revision, device, dtype)


def save_pretrained(model: Dictionary, path: str | os.PathLike, meta: dict[str, Any] | None = None,
                    model_card: bool = True) -> Path:  # fmt: skip
    """:meth:`Dictionary.save_pretrained` as a function (``sparsedict.save_pretrained``)."""
    return native.save(model, path, meta, model_card)


def mse_loss(x_hat: Tensor, y: Tensor) -> Tensor:
    """Per-token squared error summed over dimensions, averaged over tokens (fp32)."""
    return (x_hat.float() - y.float()).pow(2).sum(-1).mean()
