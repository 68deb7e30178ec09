"""Splicing dictionaries into a language model's forward pass: CE recovered, ΔLM loss, KL.

A dictionary trained at hookpoint ``h`` (an SAE) replaces the activation at ``h`` by its reconstruction
ŷ; a transcoder reads its input at ``h`` and replaces the activation at its ``target``. Only kept
positions (``keep [B, T]``: the cache's exclusion rules, BOS / first-n / special tokens / padding) are
replaced; excluded positions keep their original activations and are dropped from the CE/KL means.
The zero- and mean-ablation baselines replace the same positions of the same hookpoint by 0 or by the
mean activation; these differ from SAELens' ``ce_loss_score``, whose zero-ablation replaces every position
(BOS and attention sinks included), which ``zero_all=True`` adds as a third baseline (``ce_recovered_zero_all``). Replacements are cast to the model dtype (splicing happens in the model dtype).

CE and KL are taken at position ``t`` (the distribution over token ``t + 1``) for every kept ``t`` whose
next token is real (not padding).

Multi-layer dictionaries (cross-layer transcoders, transcoder sets): :func:`evaluate_replacement` measures the
replacement model (every output of the layer range replaced at once) beside per-layer splicing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsedict.cache import hooks
from sparsedict.dictionaries.attach import Attachment, LayeredAttachment, OnOutput
from sparsedict.dictionaries.base import Dictionary, SparseCode
from sparsedict.metrics import ReconstructionStats, SpliceStats, token_ce, token_kl


@dataclass
class Contexts:
    """Token contexts to evaluate on, with the exclusion mask of the cache the dictionary was trained on."""

    token_ids: Tensor
    """``[N, T]`` token ids."""
    attention_mask: Tensor
    """``[N, T]`` bool, False on padding."""
    keep: Tensor
    """``[N, T]`` bool, True where a position is evaluated (and spliced)."""

    def __post_init__(self) -> None:
        self.token_ids = self.token_ids.long()
        self.attention_mask = self.attention_mask.bool()
        self.keep = self.keep.bool() & self.attention_mask
        if (
            not (self.token_ids.shape == self.attention_mask.shape == self.keep.shape)
            or self.token_ids.ndim != 2
        ):
            raise ValueError(
                f"token_ids {list(self.token_ids.shape)}, attention_mask {list(self.attention_mask.shape)} and "
                f"keep {list(self.keep.shape)} must all be [n_contexts, context_length]"
            )

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for a in range(0, len(self), batch_size):
            yield (
                self.token_ids[a : a + batch_size],
                self.attention_mask[a : a + batch_size],
                self.keep[a : a + batch_size],
            )

    def head(self, max_tokens: int | None) -> Contexts:
        """The first contexts holding at least ``max_tokens`` kept positions (all when None)."""
        if max_tokens is None:
            return self
        n = int(torch.searchsorted(self.keep.sum(1).cumsum(0), torch.tensor(max_tokens))) + 1
        return Contexts(self.token_ids[:n], self.attention_mask[:n], self.keep[:n])


def replaced_hookpoint(dictionary: Dictionary) -> str:
    """The hookpoint whose activation the dictionary's output replaces (its target for transcoders)."""
    cfg = dictionary.cfg
    if not cfg.hookpoint:
        raise ValueError(f"{type(dictionary).__name__} has no hookpoint in its config: cannot splice it")
    return cfg.target if cfg.is_transcoder else cfg.hookpoint


def splice(
    model: torch.nn.Module,
    dictionary: Dictionary,
    keep: Tensor | None = None,
    error_term: bool = False,
    on_output: OnOutput | None = None,
) -> Attachment:
    """Within the block, ``model``'s activation at the dictionary's (target) hookpoint becomes ŷ.

    ``keep [B, T]`` selects the replaced positions of the next forward (None: all); only those rows go through
    the dictionary. ``error_term`` splices ``ŷ + (y − ŷ)`` instead (SAELens ``use_error_term``: must reproduce
    the clean model). ``on_output(y [M, d], ŷ [M, d], code)`` sees every reconstruction (for reconstruction
    metrics). The splice is ``dictionary.hook``'s :class:`~sparsedict.dictionaries.attach.Attachment`.
    """
    replaced_hookpoint(dictionary)  # a clear error for a dictionary without a hookpoint
    return Attachment(dictionary, model, "splice", keep=keep, error_term=error_term, on_output=on_output)


def _scatter(act: Tensor, keep: Tensor | None, new_rows: Tensor) -> Tensor:
    """``act [B, T, d]`` with the kept positions replaced by ``new_rows [M, d]``."""
    if keep is None:
        return new_rows.reshape(act.shape).to(act)
    out = act.clone()
    out[keep] = new_rows.to(act)
    return out


@contextlib.contextmanager
def ablate(
    model: torch.nn.Module, hookpoint: str, keep: Tensor | None, value: Tensor | None = None
) -> Iterator[None]:
    """Replace the activation at ``hookpoint`` (kept positions; every position when ``keep`` is None) by
    ``value [d]`` (None: zeros)."""

    def swap(act: Tensor) -> Tensor:
        n = int(keep.sum()) if keep is not None else act.shape[0] * act.shape[1]
        fill = act.new_zeros(n, act.shape[-1]) if value is None else value.to(act).expand(n, -1)
        return _scatter(act, keep, fill)

    with hooks.replace(model, hookpoint, swap):
        yield


def _next_token_logp(model, ids: Tensor, attn: Tensor, pos: Tensor) -> Tensor:
    """Log-probabilities ``[M, V]`` (fp32) at the positions ``pos [B, T-1]`` of one forward."""
    logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits
    return torch.log_softmax(logits[:, :-1][pos].float(), dim=-1)


def _clean_batches(
    model, contexts: Contexts, batch_size: int, device: str | torch.device
) -> Iterator[tuple[Tensor, ...]]:
    """Each batch ``ids, attn, keep`` of ``contexts`` on ``device``, with the scored positions ``pos [B, T-1]``,
    their next tokens ``labels [M]`` and the clean model's log-probabilities there ``[M, V]``."""
    for ids, attn, keep in contexts.batches(batch_size):
        ids, attn, keep = ids.to(device), attn.to(device), keep.to(device)
        pos = keep[:, :-1] & attn[:, 1:]
        yield ids, attn, keep, pos, ids[:, 1:][pos], _next_token_logp(model, ids, attn, pos)


@torch.no_grad()
def activation_means(model, hookpoints: list[str], contexts: Contexts, batch_size: int = 8,
                     device: str | torch.device = "cpu") -> dict[str, Tensor]:  # fmt: skip
    """Mean activation ``[d]`` at each hookpoint over the kept positions of ``contexts`` (for mean-ablation)."""
    sums: dict[str, Tensor] = {}
    count = 0
    for ids, attn, keep in contexts.batches(batch_size):
        hps = [hooks.resolve(model, h) for h in hookpoints]
        acts = hooks.record(model, hps, ids.to(device), attention_mask=attn.long().to(device))
        for name, hp in zip(hookpoints, hps):
            s = acts[hp.name][keep.to(device)].double().sum(0).cpu()
            sums[name] = sums[name] + s if name in sums else s
        count += int(keep.sum())
    return {name: (s / max(1, count)).float() for name, s in sums.items()}


@torch.no_grad()
def evaluate_splicing(
    model: torch.nn.Module,
    dictionaries: dict[str, Dictionary],
    contexts: Contexts,
    batch_size: int = 4,
    means: dict[str, Tensor] | None = None,
    mean_ablation: bool = True,
    device: str | torch.device = "cpu",
    zero_all: bool = False,
) -> tuple[dict[str, SpliceStats], dict[str, ReconstructionStats]]:
    """CE/KL splice statistics and reconstruction statistics of every dictionary on ``contexts``.

    Per batch: one clean forward, one zero-ablation (and one mean-ablation) forward per replaced
    hookpoint, one spliced forward per dictionary. ``means`` maps a replaced hookpoint to its mean
    activation ``[d]``; missing ones are computed from ``contexts`` when ``mean_ablation``. ``zero_all`` adds
    one forward per replaced hookpoint with every position zeroed (SAELens' baseline).
    Reconstruction statistics cover the kept positions, from activations seen in the spliced forward.
    """
    targets = sorted({replaced_hookpoint(d) for d in dictionaries.values()})
    means = dict(means or {})
    if mean_ablation:
        missing = [t for t in targets if t not in means]
        if missing:
            means.update(activation_means(model, missing, contexts, batch_size * 2, device))
    splice_stats = {name: SpliceStats() for name in dictionaries}
    recon = {name: ReconstructionStats(d.n_latents) for name, d in dictionaries.items()}
    for d in dictionaries.values():
        d.eval()
    for ids, attn, keep, pos, labels, logp_clean in _clean_batches(model, contexts, batch_size, device):
        ce_clean = token_ce(logp_clean, labels)
        base: dict[str, dict[str, Tensor]] = {}
        for target in targets:
            with ablate(model, target, keep):
                lp = _next_token_logp(model, ids, attn, pos)
            base[target] = {"ce_zero": token_ce(lp, labels), "kl_zero": token_kl(logp_clean, lp)}
            if mean_ablation:
                with ablate(model, target, keep, means[target]):
                    lp = _next_token_logp(model, ids, attn, pos)
                base[target].update(ce_mean=token_ce(lp, labels), kl_mean=token_kl(logp_clean, lp))
            if zero_all:
                with ablate(model, target, None):
                    lp = _next_token_logp(model, ids, attn, pos)
                base[target]["ce_zero_all"] = token_ce(lp, labels)
            del lp
        for name, d in dictionaries.items():

            def seen(y: Tensor, y_hat: Tensor, code: SparseCode, name: str = name) -> None:
                recon[name].update(y, y_hat, code)

            with splice(model, d, keep, on_output=seen):
                lp = _next_token_logp(model, ids, attn, pos)
            splice_stats[name].update(ce_clean=ce_clean, ce_spliced=token_ce(lp, labels),
                                      kl_spliced=token_kl(logp_clean, lp), **base[replaced_hookpoint(d)])  # fmt: skip
            del lp
    return splice_stats, recon


@torch.no_grad()
def evaluate_replacement(
    model: torch.nn.Module,
    dictionaries: dict[str, torch.nn.Module],
    contexts: Contexts,
    batch_size: int = 4,
    means: dict[str, Tensor] | None = None,
    mean_ablation: bool = True,
    per_layer: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, SpliceStats]]:
    """The replacement model of each multi-layer dictionary (CLT or transcoder set), beside per-layer splicing.

    ``"replacement"``: every output of the dictionary's layer range replaced at once by its output (later layers
    read inputs computed from the replaced ones); its baselines zero- (mean-) ablate all those outputs at once.
    ``"layer<l>"`` (with ``per_layer``): only layer l's output replaced, computed from the clean inputs, with the
    baselines ablating that output alone. Same positions, CE and KL as :func:`evaluate_splicing`; the splice is
    ``dictionary.hook``'s :class:`~sparsedict.dictionaries.attach.LayeredAttachment`.
    """
    variants: dict[str, list[tuple[str, tuple[str, ...], list[int] | None]]] = {}
    for name, d in dictionaries.items():
        targets = tuple(d.cfg.targets)
        rows = [("replacement", targets, None)]
        if per_layer:
            rows += [(f"layer{layer}", (t,), [j]) for j, (layer, t) in enumerate(zip(d.layers, targets))]
        variants[name] = rows
    ablated = sorted({hps for rows in variants.values() for _, hps, _ in rows})
    means = dict(means or {})
    if mean_ablation:
        missing = sorted({h for hps in ablated for h in hps if h not in means})
        if missing:
            means.update(activation_means(model, missing, contexts, batch_size * 2, device))
    stats = {name: {v: SpliceStats() for v, _, _ in rows} for name, rows in variants.items()}
    for d in dictionaries.values():
        d.eval()
    for ids, attn, keep, pos, labels, logp_clean in _clean_batches(model, contexts, batch_size, device):
        ce_clean = token_ce(logp_clean, labels)
        base: dict[tuple[str, ...], dict[str, Tensor]] = {}
        for hps in ablated:
            runs = [("zero", None)] + ([("mean", means)] if mean_ablation else [])
            for kind, values in runs:
                with contextlib.ExitStack() as stack:
                    for h in hps:
                        stack.enter_context(ablate(model, h, keep, None if values is None else values[h]))
                    lp = _next_token_logp(model, ids, attn, pos)
                base.setdefault(hps, {}).update(
                    {f"ce_{kind}": token_ce(lp, labels), f"kl_{kind}": token_kl(logp_clean, lp)}
                )
            del lp
        for name, d in dictionaries.items():
            for variant, hps, layers in variants[name]:
                with LayeredAttachment(d, model, "splice", keep=keep, layers=layers):
                    lp = _next_token_logp(model, ids, attn, pos)
                stats[name][variant].update(ce_clean=ce_clean, ce_spliced=token_ce(lp, labels),
                                            kl_spliced=token_kl(logp_clean, lp), **base[hps])  # fmt: skip
                del lp
    return stats
