"""Shared test builders: dictionaries, identity dictionaries, small caches, planted data and training.

- :func:`make_dict` builds any registered architecture at a small size (seeded);
- :func:`identity_dict` builds a ReLU or TopK dictionary that reconstructs its input exactly;
- :func:`small_cache` caches a few hundred tokens of the shipped corpus sample from the real SmolLM2;
- :func:`planted_data` / :func:`mean_max_cosine`: a planted dictionary and how well one is recovered;
- :func:`train_dictionary`: the real Trainer on in-memory rows.

``planted_data`` draws ``n_atoms`` random unit-norm atoms in ``R^d`` and builds each row as a sparse
non-negative combination of ``k_active`` distinct atoms (coefficients ``U(0.5, 2.5)``), plus Gaussian noise
and a constant offset (so that ``b_dec`` has something to learn). A dictionary learner that works should
recover the atoms as decoder directions; ``mean_max_cosine`` measures how well.
"""

from __future__ import annotations

import tempfile

import torch
from torch import Tensor

from sparsedict.dictionaries import build, lookup


def make_dict(
    arch: str, d_in: int = 16, n_latents: int = 40, d_out: int | None = None, seed: int = 0, **fields
):
    """A freshly built ``arch`` dictionary (config fields ``fields``), seeded with ``torch.manual_seed(seed)``."""
    _, cfg_cls = lookup(arch)
    torch.manual_seed(seed)
    if d_out is not None:
        fields["d_out"] = d_out
    return build(cfg_cls(d_in=d_in, n_latents=n_latents, **fields).resolved(d_in, d_out))


def identity_dict(d: int, hookpoint: str = "", arch: str = "topk"):
    """A ``relu`` or ``topk`` dictionary with ``W_enc = [I, −I]``, ``W_dec = [I; −I]`` and zero biases, so
    ``x̂ = relu(x) − relu(−x) = x`` exactly (TopK keeps all 2d latents; no b_dec subtraction)."""
    fields = {"k": 2 * d} if arch == "topk" else {}
    model = make_dict(
        arch, d, 2 * d, hookpoint=hookpoint, apply_b_dec_to_input=False, b_dec_init="zero", **fields
    )
    eye = torch.eye(d)
    with torch.no_grad():
        model.W_enc.copy_(torch.cat([eye, -eye], 1))
        model.W_dec.copy_(torch.cat([eye, -eye], 0))
        model.b_enc.zero_()
        model.b_dec.zero_()
    return model.eval()


def small_cache(out_dir, hookpoints: list[str], max_tokens: int, **fields):
    """Cache ``hookpoints`` of the embedded SmolLM2 over ``max_tokens`` tokens of the shipped corpus sample."""
    from sparsedict.cache import CacheConfig, cache_activations

    cfg = {"dataset": "embedded-sample", "progress": False, "num_threads": 1, **fields}
    return cache_activations(
        CacheConfig(hookpoints=hookpoints, max_tokens=max_tokens, out_dir=str(out_dir), **cfg)
    )


def planted_data(
    d: int = 64,
    n_atoms: int = 256,
    k_active: int = 6,
    n_rows: int = 60_000,
    noise: float = 0.01,
    offset: float = 0.5,
    seed: int = 0,
    nonneg: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return ``(x [n_rows, d], atoms [n_atoms, d])`` with ``x = Σ_j c_j atom_{i_j} + noise + offset``.

    Atoms have unit norm. With ``nonneg=True`` the atoms are ``|N(0,1)|`` directions (non-negative
    entries) and the noise is clamped so that every entry of ``x`` is ≥ 0 (for SNMF-style tests).
    Deterministic in ``seed`` (a private generator; the global RNG is untouched).
    """
    if k_active > n_atoms:
        raise ValueError(f"k_active={k_active} exceeds n_atoms={n_atoms}")
    # Salted: a model initialised right after torch.manual_seed(seed) must not draw the planted atoms
    # from the same random stream (that made W_dec start at the answer).
    g = torch.Generator().manual_seed(seed + 7_919_000_003)
    atoms = torch.randn(n_atoms, d, generator=g)
    if nonneg:
        atoms = atoms.abs()
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    # k distinct atoms per row: the indices of the k smallest of n uniform draws.
    idx = torch.rand(n_rows, n_atoms, generator=g).argsort(dim=1)[:, :k_active]
    coef = torch.rand(n_rows, k_active, generator=g) * 2.0 + 0.5
    x = torch.einsum("rk,rkd->rd", coef, atoms[idx])
    x = x + noise * torch.randn(n_rows, d, generator=g) + offset
    if nonneg:
        x = x.clamp_min(0.0)
    return x, atoms


def mean_max_cosine(learned: Tensor, true: Tensor, absolute: bool = True) -> float:
    """For each true atom (row of ``true [m, d]``), the best cosine over ``learned [n, d]``; averaged.

    ``absolute=True`` uses ``|cos|`` (sign-free: a learned direction may be a negated atom).
    """
    learned = learned.detach().float()
    true = true.detach().float()
    a = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = a @ b.T  # [n, m]
    if absolute:
        cos = cos.abs()
    return cos.max(dim=0).values.mean().item()


def train_dictionary(
    model,
    x: Tensor,
    y: Tensor | None = None,
    *,
    batch_size: int = 256,
    epochs: float = 4,
    lr: float = 2e-3,
    normalise_inputs: str = "none",
    warmup_steps: int = 50,
    seed: int = 0,
    out_dir: str | None = None,
    **train_kw,
) -> dict[str, float]:
    """Train ``model`` on in-memory rows with the real :class:`~sparsedict.train.Trainer`; returns last metrics.

    ``out_dir`` (logs, checkpoint) defaults to a new temporary directory.
    """
    from sparsedict.train import TensorSource, TrainConfig, Trainer
    from sparsedict.train.trainer import source_key

    kw = dict(
        batch_size=batch_size,
        epochs=epochs,
        lr=lr,
        normalise_inputs=normalise_inputs,
        warmup_steps=warmup_steps,
        seed=seed,
        out_dir=out_dir or tempfile.mkdtemp(prefix="sparsedict-test-train-"),
        log_every=10**9,
        init_rows=min(8192, x.shape[0]),
    )
    kw.update(train_kw)
    cfg = TrainConfig(**kw)
    source = TensorSource(x, y, batch_size=batch_size, seed=seed)
    trainer = Trainer({"m": model}, {source_key(model): source}, cfg)
    return trainer.fit(resume=False)


EXPORT_FIXTURES: dict[str, dict] = {
    "standard": {"arch": "relu", "hookpoint": "resid_post.3", "input_scale": 0.5},
    "transcoder": {"arch": "relu", "hookpoint": "mlp_in.2", "target": "mlp_out.2", "d_out": 12},
    "skip_transcoder": {"arch": "relu", "hookpoint": "mlp_in.2", "target": "mlp_out.2", "d_out": 12, "skip": True},
    "topk": {"arch": "topk", "hookpoint": "resid_post.3", "k": 6, "input_scale": 2.0},
    "topk_attn_z": {"arch": "topk", "hookpoint": "attn_z.4", "k": 6, "n_heads": 4},
    "topk_attn_z_head": {"arch": "topk", "hookpoint": "attn_z.4.h1", "k": 6},
    "jumprelu": {"arch": "jumprelu", "hookpoint": "resid_post.3", "input_scale": 0.7},
    "jumprelu_transcoder": {"arch": "jumprelu", "hookpoint": "mlp_in.2", "target": "mlp_out.2",
                            "d_out": 12},
    "jumprelu_skip_transcoder": {"arch": "jumprelu", "hookpoint": "mlp_in.2", "target": "mlp_out.2", "d_out": 12,
                                 "skip": True},
    "gated": {"arch": "gated", "hookpoint": "resid_post.3", "input_scale": 1.5},
    "batchtopk": {"arch": "batchtopk", "hookpoint": "resid_post.3", "k": 6, "input_scale": 2.0},
    "matryoshka_batchtopk": {"arch": "matryoshka", "hookpoint": "resid_post.3", "k": 6, "group_sizes": [8, 16, 24]},
    "matryoshka_topk": {"arch": "matryoshka", "hookpoint": "resid_post.3", "k": 6, "selection": "topk",
                        "group_sizes": [8, 16, 24]},
}  # fmt: skip
"""Dictionaries of ours exported to SAELens for ``tests/data/peers/saelens/export_<name>/`` (d_in 16, 48 latents):
made by :func:`export_fixture_model` in ``scripts/peer_fixtures/gen_sparsedict_exports.py``, loaded and run by
SAELens itself in ``check_sparsedict_exports.py``."""


def export_fixture_model(name: str, seed: int = 0):
    """The seeded dictionary behind export fixture ``name``: random biases and skip weights, decoder rows of
    0.5–1.5 × unit norm where the architecture allows it, thresholds in [0.1, 0.5], an input scale ≠ 1 where the
    spec gives one (the export folds it), in eval mode."""
    spec = dict(EXPORT_FIXTURES[name])
    arch, scale = spec.pop("arch"), spec.pop("input_scale", 1.0)
    spec.pop("n_heads", None)
    model = make_dict(arch, 16, 48, seed=seed, **spec)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, t in [*model.named_parameters(), *model.named_buffers()]:
            if pname == "threshold":
                t.copy_(torch.rand(t.shape, generator=g) * 0.4 + 0.1)
            elif pname.startswith("b_") or pname == "r_mag":
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif pname == "W_skip":
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
        if not model.unit_norm_decoder:
            model.W_dec.mul_(0.5 + torch.rand(model.W_dec.shape[0], 1, generator=g))
        model.input_scale.fill_(scale)
    return model.eval()
