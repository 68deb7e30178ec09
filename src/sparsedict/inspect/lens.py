"""Decoder logit lens and nearest features.

Logit lens of latent ``i``: the unembedding applied to its decoder direction as the model's final norm
would pass it, ``logits_i = norm(u_i) · W_Uᵀ`` with ``u_i`` the direction in the residual stream:

- ``u_i = W_dec[i]`` when the decoder writes the residual stream (``resid_*``, ``mlp_out``,
  ``attn_out``); for a transcoder the decoder is its target side (e.g. ``mlp_out``);
- a decoder that writes the input of a linear map into the residual stream (``mlp_hidden.L`` = input
  of ``down_proj``, ``attn_z.L`` = input of ``o_proj``, one head's columns for ``attn_z.L.hK``) is
  mapped through that map's weight: ``u_i = W_proj · W_dec[i]`` (the bias is not direction-specific);
- ``norm``: the final RMSNorm's gain ``γ ⊙ u`` (Gemma: ``(1 + γ) ⊙ u``); for a LayerNorm also the
  centring ``u − mean(u)`` first. The data-dependent ``1/rms`` factor is dropped: it scales all logits
  of a direction alike, so the ranking and relative sizes hold. Logit soft-capping (Gemma 2) is
  monotone and ignored.

Values are per unit of latent activation (decoder rows as stored). For a dictionary early in the
network the lens is noisy: the residual stream there is far from what the unembedding reads.

Nearest features: cosine similarity of decoder rows, computed in blocks of rows so the ``[n, n]``
matrix is never held.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

FINAL_NORMS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.final_layernorm", "model.decoder.final_layer_norm")  # fmt: skip
"""Module paths searched for the model's final norm, in order."""
BLOCK = 256
"""Directions per block of the lens and of the cosine search."""


def _linear_weight(module: nn.Module) -> Tensor | None:
    """``[out, in]`` weight of a Linear (or GPT-2's Conv1D, stored ``[in, out]``), else None."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.T
    return None


def residual_directions(model: nn.Module, decoder: Tensor, hookpoint: str) -> tuple[Tensor | None, str]:
    """Decoder rows ``[m, d_out]`` written at ``hookpoint`` as residual-stream directions ``[m, d_model]``.

    Returns ``(directions or None, note)``; None with a note saying why when there is no such map.
    """
    from sparsedict.cache import hooks

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    d_model = int(cfg.hidden_size)
    hp = hooks.resolve(model, hookpoint)
    w = _linear_weight(model.get_submodule(hp.module_path)) if hp.side == "in" else None
    if w is not None and w.shape[0] == d_model:
        if hp.head is not None:
            w = w[:, hp.head * hp.d_head : (hp.head + 1) * hp.d_head]
        if w.shape[1] == decoder.shape[1]:
            return (
                decoder.float() @ w.detach().float().T,
                f"{hookpoint} mapped through {hp.module_path}.weight",
            )
    if decoder.shape[1] == d_model:
        return decoder.float(), f"{hookpoint} is in the residual stream (d={d_model})"
    return None, (f"no logit lens: {hookpoint} (d={decoder.shape[1]}) is neither the residual stream "
                  f"(d={d_model}) nor the input of a linear map into it")  # fmt: skip


def final_norm(model: nn.Module) -> tuple[Tensor | None, bool, str]:
    """``(gain or None, centre, name)`` of the model's final norm."""
    modules = dict(model.named_modules())
    for path in FINAL_NORMS:
        norm = modules.get(path)
        if norm is None:
            continue
        weight = getattr(norm, "weight", None)
        kind = type(norm).__name__
        gain = None if weight is None else weight.detach().float()
        if gain is not None and "Gemma" in kind:
            gain = 1.0 + gain
        return gain, isinstance(norm, nn.LayerNorm) or "LayerNorm" in kind, f"{path} ({kind})"
    return None, False, "none found"


HIST_BINS = 40
"""Bins of the per-direction histogram of the logits over the vocabulary."""


def logit_lens(model: nn.Module, directions: Tensor, k: int, vocab: int) -> tuple[dict[str, Tensor], str]:
    """Top and bottom ``k`` tokens (ids < ``vocab``) of ``norm(u) · W_Uᵀ`` for each direction ``u``.

    Returns ``({"top_ids", "top_values", "bottom_ids", "bottom_values"}`` (``[m, k]``, bottom ascending)
    ``+ {"hist_counts", "hist_centres"}`` (``[m, HIST_BINS]``: the logits over the vocabulary in equal
    bins between their min and max), ``note)``.
    """
    W_U = model.get_output_embeddings().weight.detach()[:vocab].float()
    gain, centre, name = final_norm(model)
    tops, topv, bots, botv, hc, hv = [], [], [], [], [], []
    for a in range(0, len(directions), BLOCK):
        u = directions[a : a + BLOCK].float()
        if centre:
            u = u - u.mean(1, keepdim=True)
        if gain is not None:
            u = u * gain
        logits = u @ W_U.T
        t = logits.topk(min(k, vocab), dim=1)
        b = logits.topk(min(k, vocab), dim=1, largest=False)
        tops.append(t.indices)
        topv.append(t.values)
        bots.append(b.indices)
        botv.append(b.values)
        lo, hi = b.values[:, :1], t.values[:, :1]
        width = (hi - lo).clamp_min(1e-12) / HIST_BINS
        idx = ((logits - lo) / width).long().clamp_(0, HIST_BINS - 1)
        hc.append(
            torch.zeros(len(u), HIST_BINS, dtype=torch.int64, device=u.device).scatter_add_(
                1, idx, torch.ones_like(idx)
            )
        )
        hv.append(lo + width * (torch.arange(HIST_BINS, device=u.device) + 0.5))
    note = f"final norm {name}{' (centred)' if centre else ''}; unembedding {W_U.shape[0]} tokens"
    out = {"top_ids": tops, "top_values": topv, "bottom_ids": bots, "bottom_values": botv,
           "hist_counts": hc, "hist_centres": hv}  # fmt: skip
    return {key: torch.cat(v) for key, v in out.items()}, note


def nearest(decoder: Tensor, latents: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` latents whose decoder rows have the highest cosine with each of ``latents`` (self excluded).

    ``decoder [n, d]``; returns ``(ids [m, k], cosines [m, k])``, computed ``BLOCK`` rows at a time.
    """
    w = decoder.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = min(k, w.shape[0] - 1)
    ids, cos = [], []
    for a in range(0, len(latents), BLOCK):
        rows = latents[a : a + BLOCK]
        sim = w[rows] @ w.T
        sim[torch.arange(len(rows)), rows] = -float("inf")
        top = sim.topk(k, dim=1)
        ids.append(top.indices)
        cos.append(top.values)
    if not ids:
        return torch.empty(0, k, dtype=torch.int64), torch.empty(0, k)
    return torch.cat(ids), torch.cat(cos)
