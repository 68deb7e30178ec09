"""SNMF: semi-nonnegative factorisation of MLP hidden activations (Shafran et al. 2025).

``A ≈ F Gᵀ`` with ``A = Xᵀ [d, N]`` (tokens as columns), ``F [d, K]`` mixed-sign features (each a sparse
combination of neurons) and ``G [N, K] ≥ 0`` per-token codes. In our layout ``W_dec = Fᵀ [K, d]`` and a code
is a dense non-negative ``[B, K]``; ``x̂ = g W_dec`` (+ ``b_dec``, zero unless ``b_dec_init`` asks for a
centred factorisation — the paper has no bias).

Three solvers:

- :func:`snmf_full_batch` — the paper's full-batch multiplicative-update algorithm (reference, small data):
  ``F ← A G (GᵀG + 1e-6 I)⁻¹``; winner-take-all keeps the top ``⌈s·d⌉`` |entries| of each F column; G columns
  rescaled to unit norm (F columns absorb the norms); ``G ← G ⊙ sqrt(([AᵀF]⁺ + G[FᵀF]⁻) / ([AᵀF]⁻ +
  G[FᵀF]⁺ + 1e-6))``; loss ``‖A − F Gᵀ‖²``; keep the best; stop after ``patience`` iterations without progress.
- :meth:`SNMF.fit_step` — streaming (Mairal et al. 2010 style) for data larger than RAM, one minibatch at a
  time from the trainer: codes by NNLS against the current F, sufficient statistics
  ``C ← (1−w)C + w GᵀG/b`` ``[K, K]`` and ``S ← (1−w)S + w XᵀG/b`` ``[d, K]``, ``F ← S (C + εI)⁻¹``, WTA,
  unit-norm F columns (C and S rescaled to match, so the statistics stay consistent). Memory
  O(d·K + K²), independent of the token count. State (C, S, step) is in buffers: checkpoints resume.
- :func:`nnls` — batched accelerated projected gradient (FISTA with adaptive restart, step 1/L with L the
  largest eigenvalue of the Gram ``W_dec W_decᵀ``) for ``min_{g≥0} ½‖x − g W_dec‖² + λ Σg``; this is
  ``encode``, converging in ≤ 100 iterations where the paper's multiplicative code update needs ~2000.

Sparsity control: ``sparsity`` (fraction of neurons per feature, the paper's WTA) and ``code_l1`` (an L1
penalty on the codes in the NNLS, 0 by default as in the paper).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register


@dataclass
class SNMFConfig(DictionaryConfig):
    architecture: str = "snmf"
    """Registered architecture name."""
    n_latents: int = 100
    """Number of features K (the paper's rank; 100 in its scripts)."""
    b_dec_init: str = "zero"
    """'zero' (the paper: no bias); 'mean'/'median' factorise the centred activations x − b_dec instead."""
    sparsity: float = 0.01
    """Winner-take-all: fraction of neurons kept per feature (⌈s·d⌉ entries of each F column); 1.0 = dense."""
    code_l1: float = 0.0
    """L1 penalty λ on the codes in the NNLS (code sparsity; 0 = the paper's unpenalised codes)."""
    code_iters: int = 50
    """NNLS iterations per training minibatch (streaming solver). Chosen by measurement: benchmarks/RESULTS.md."""
    encode_iters: int = 100
    """Maximum NNLS iterations in ``encode``."""
    encode_tol: float = 1e-5
    """Stop the NNLS when the relative change of the codes falls below this."""
    memory_tokens: int = 200_000
    """Forgetting window of the streaming statistics: weight ``w = max(1/t, b/memory_tokens)``."""
    ridge: float = 1e-6
    """Ridge ε in ``F ← S(C + εI)⁻¹``, relative to ``trace(C)/K``."""

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(
                f"sparsity must be in (0, 1] (fraction of neurons per feature), got {self.sparsity}"
            )
        if self.code_l1 < 0:
            raise ValueError(f"code_l1 must be >= 0, got {self.code_l1}")


# -- codes ------------------------------------------------------------------------------------------------
@torch.no_grad()
def nnls(
    x: Tensor, W: Tensor, iters: int = 100, tol: float = 1e-5, l1: float = 0.0, init: Tensor | None = None
) -> tuple[Tensor, int]:
    """``argmin_{g ≥ 0} ½‖x − g W‖² + l1·Σg`` for every row: ``x [B, d]``, ``W [K, d]`` -> ``(g [B, K], iters)``.

    FISTA with gradient-based adaptive restart per row; step ``1/L``, ``L = λ_max(W Wᵀ)``. Starts from
    ``init`` (warm start) or from the clamped unconstrained least-squares solution.
    """
    H = W @ W.T  # [K, K]
    Hd = H.double()
    L = float(torch.linalg.eigvalsh(Hd)[-1]) * 1.0001 + 1e-12
    b = x @ W.T  # [B, K]
    if init is None:
        eye = torch.eye(H.shape[0], dtype=torch.float64, device=H.device)
        ridge = 1e-6 * float(Hd.diagonal().mean()) + 1e-12
        g = (b.double() @ torch.linalg.inv(Hd + ridge * eye)).to(x.dtype).clamp_min_(0)
    else:
        g = init.clone().clamp_min_(0)
    y, t = g.clone(), torch.ones(g.shape[0], 1, dtype=g.dtype, device=g.device)
    it = 0
    for it in range(1, iters + 1):
        g_new = (y - (y @ H - b + l1) / L).clamp_min_(0)
        step = g_new - g
        restart = ((y - g_new) * step).sum(1, keepdim=True) > 0  # momentum points uphill: reset it
        t_new = (1 + torch.sqrt(1 + 4 * t * t)) / 2
        t_new = torch.where(restart, torch.ones_like(t_new), t_new)
        y = g_new + torch.where(restart, torch.zeros_like(t), (t - 1) / t_new) * step
        g, t = g_new, t_new
        if it % 10 == 0 and float(step.norm()) <= tol * float(g.norm()) + 1e-30:
            break
    return g, it


def _wta(F: Tensor, sparsity: float) -> Tensor:
    """Keep the ⌈sparsity·d⌉ largest-|value| entries of each column of ``F [d, K]``, zero the rest."""
    d = F.shape[0]
    keep = min(d, max(1, math.ceil(sparsity * d)))
    if keep >= d:
        return F
    idx = F.abs().topk(keep, dim=0).indices
    return torch.zeros_like(F).scatter_(0, idx, F.gather(0, idx))


# -- the paper's full-batch solver ---------------------------------------------------------------------------
@dataclass
class SNMFResult:
    F: Tensor
    """Features ``[d, K]`` (best iterate)."""
    G: Tensor
    """Codes ``[N, K] ≥ 0`` (best iterate)."""
    losses: list[float] = field(default_factory=list)
    """``‖A − F Gᵀ‖²_F`` after every iteration."""
    best_iter: int = 0


@torch.no_grad()
def snmf_full_batch(
    X: Tensor,
    K: int,
    sparsity: float | None = 0.01,
    iters: int = 1000,
    init: str = "random",
    patience: int = 1500,
    seed: int = 0,
    eps: float = 1e-6,
) -> SNMFResult:
    """The paper's semi-NMF with WTA on ``X [N, d]`` (tokens as rows); returns the best iterate.

    ``init``: 'random' (G ~ U(0,1) clamped ≥ 1e-6, F ~ N(0,1)) or 'svd' (F = U√Σ, G = clamp(V√Σ, 1e-6)).
    ``sparsity=None`` (or 1.0) disables WTA, which makes it plain semi-NMF (Ding, Li, Jordan 2010), whose loss
    is non-increasing. Memory is O(N·(d + K)); use the streaming solver for large N.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = X.T  # [d, N]
    d, N = A.shape
    if init == "svd":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        F = U[:, :K] * S[:K].sqrt()
        G = (Vh[:K].T * S[:K].sqrt()).clamp_min(1e-6)
    elif init == "random":
        G = torch.rand(N, K, generator=gen).to(A).clamp_min(1e-6)
        F = torch.randn(d, K, generator=gen).to(A)
    else:
        raise ValueError(f"init must be 'random' or 'svd', not {init!r}")
    eye = torch.eye(K, dtype=A.dtype, device=A.device)
    best = SNMFResult(F.clone(), G.clone(), [], 0)
    best_loss, since = math.inf, 0
    for it in range(iters):
        F = A @ G @ torch.linalg.inv(G.T @ G + eps * eye)
        if sparsity is not None and sparsity < 1.0:
            F = _wta(F, sparsity)
        norms = G.norm(dim=0).clamp_min(1e-12)
        G, F = G / norms, F * norms
        AtF, FtF = A.T @ F, F.T @ F
        pos = lambda M: (M.abs() + M) / 2  # noqa: E731
        neg = lambda M: (M.abs() - M) / 2  # noqa: E731
        G = G * torch.sqrt((pos(AtF) + G @ neg(FtF)) / (neg(AtF) + G @ pos(FtF) + eps))
        loss = float((A - F @ G.T).pow(2).sum())
        best.losses.append(loss)
        if loss < best_loss:
            best_loss, since = loss, 0
            best.F, best.G, best.best_iter = F.clone(), G.clone(), it
        else:
            since += 1
            if since >= patience:
                break
    return best


# -- the dictionary ------------------------------------------------------------------------------------------
@register("snmf", SNMFConfig)
class SNMF(Dictionary):
    """SNMF dictionary: ``W_dec [K, d]`` = Fᵀ, non-negative dense codes from :func:`nnls`. Not gradient-trained."""

    cfg: SNMFConfig
    unit_norm_decoder = False
    trains_by_gradient = False
    supports_transcoder = False
    sparsity_fields = ("sparsity", "code_l1")

    def __init__(self, cfg: SNMFConfig):
        if cfg.is_transcoder or (cfg.d_out and cfg.d_out != cfg.d_in) or cfg.skip:
            raise ValueError(
                "SNMF factorises one activation matrix: a transcoder target or skip connection is not supported. "
                "Remove 'target'/'skip' (SNMF on MLP hidden activations: hookpoint mlp_hidden.<layer>)."
            )
        super().__init__(cfg)
        for p in self.parameters():
            p.requires_grad_(False)
        K, d = cfg.n_latents, cfg.d_in
        self.register_buffer("stat_C", torch.zeros(K, K, dtype=torch.float64))
        self.register_buffer("stat_S", torch.zeros(d, K, dtype=torch.float64))
        self.register_buffer("stat_steps", torch.zeros((), dtype=torch.long))

    def _init_encoder(self, w_dec: Tensor) -> None:
        """The encoder is the NNLS against W_dec: no W_enc / b_enc parameters."""
        self.register_parameter("W_enc", None)
        self.register_parameter("b_enc", None)

    @classmethod
    def from_factors(cls, F: Tensor, cfg: SNMFConfig | None = None, **overrides) -> SNMF:
        """Wrap a factor ``F [d, K]`` (e.g. from :func:`snmf_full_batch`) as a dictionary."""
        d, K = F.shape
        cfg = (cfg or SNMFConfig(**overrides)).resolved(d)
        import dataclasses

        model = cls(dataclasses.replace(cfg, n_latents=K))
        model.W_dec.copy_(F.T.to(model.W_dec.dtype))
        return model

    def _centre(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.b_dec_init != "zero" else x

    def encode(self, x: Tensor, init: Tensor | None = None) -> SparseCode:
        """Non-negative codes ``[B, K]`` (dense SparseCode) by NNLS against the fixed dictionary."""
        self.check_input(x)
        g, _ = nnls(
            self._centre(x.to(self.W_dec.dtype)),
            self.W_dec.detach(),
            self.cfg.encode_iters,
            self.cfg.encode_tol,
            self.cfg.code_l1,
            init,
        )
        return SparseCode(g, None, self.n_latents)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        code = self.encode(x)
        x_hat = self.decode(code)
        return Output(x_hat, code, {"mse": mse_loss(x_hat, x)})

    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec per ``b_dec_init``; F columns from K random (centred) sample rows, WTA'd, unit norm."""
        super().init_from_data(x, None)
        xc = self._centre(x)
        rows = torch.randperm(xc.shape[0])[: self.n_latents]
        if rows.numel() < self.n_latents:
            rows = torch.randint(0, xc.shape[0], (self.n_latents,))
        F = _wta(xc[rows.to(x.device)].T.to(self.W_dec.dtype), self.cfg.sparsity)
        F = F + 1e-6 * torch.randn_like(F) * (F == 0)
        self.W_dec.copy_((F / F.norm(dim=0).clamp_min(1e-12)).T)
        self.stat_C.zero_()
        self.stat_S.zero_()
        self.stat_steps.zero_()

    @torch.no_grad()
    def fit_step(self, x: Tensor, y: Tensor | None = None) -> Output:
        """One streaming step on a minibatch ``x [b, d]``; returns the batch's output before the update."""
        if y is not None and y is not x and not torch.equal(y, x):
            raise ValueError("SNMF reconstructs its input; it cannot be trained with a different target")
        self.check_input(x)
        xc = self._centre(x.to(self.W_dec.dtype))
        W = self.W_dec.detach()
        g, _ = nnls(xc, W, self.cfg.code_iters, 0.0, self.cfg.code_l1)
        x_hat = self.decode(SparseCode(g, None, self.n_latents))
        out = Output(x_hat, SparseCode(g, None, self.n_latents), {"mse": mse_loss(x_hat, x)})
        b = x.shape[0]
        t = int(self.stat_steps) + 1
        w = max(1.0 / t, b / max(1, self.cfg.memory_tokens))
        gd, xd = g.double(), xc.double()
        self.stat_C.mul_(1 - w).add_(gd.T @ gd, alpha=w / b)
        self.stat_S.mul_(1 - w).add_(xd.T @ gd, alpha=w / b)
        self.stat_steps.fill_(t)
        self._update_dictionary(xd, gd)
        return out

    @torch.no_grad()
    def _update_dictionary(self, xd: Tensor, gd: Tensor) -> None:
        """``F ← S(C + εI)⁻¹``, revive unused features, WTA, unit-norm columns (statistics rescaled to match)."""
        C, S = self.stat_C, self.stat_S
        K = C.shape[0]
        eps = self.cfg.ridge * float(C.diagonal().mean()) + 1e-12
        F = torch.linalg.solve(C + eps * torch.eye(K, dtype=C.dtype, device=C.device), S.T).T  # S (C+εI)^-1
        unused = C.diagonal() <= 1e-10 * float(C.diagonal().max().clamp_min(1e-30))
        if bool(unused.any()):
            # a feature no token uses gets the worst-reconstructed rows of this batch as a fresh direction
            err = (xd - gd @ self.W_dec.double()).pow(2).sum(1)
            rows = err.topk(int(unused.sum())).indices
            F[:, unused] = xd[rows].T
            S[:, unused] = 0
            C[unused, :] = 0
            C[:, unused] = 0
        F = _wta(F, self.cfg.sparsity)
        norms = F.norm(dim=0).clamp_min(1e-12)
        F = F / norms
        # codes under the normalised F are g·norms: keep C and S consistent with that
        C.mul_(norms[:, None] * norms[None, :])
        S.mul_(norms[None, :])
        self.W_dec.copy_(F.T.to(self.W_dec.dtype))

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold ``input_scale`` c: ``W_dec /= c``, ``b_dec /= c``, ``code_l1 /= c²``; codes on raw inputs are unchanged.

        The codes minimise ``½‖c·x − g W_dec‖² + λ Σg``; with ``W' = W_dec / c`` that is ``c²(½‖x − g W'‖² + (λ/c²) Σg)``,
        so the same g needs ``λ' = λ / c²`` on raw x.
        """
        c = float(self.input_scale)
        if c != 1.0:
            self.W_dec.div_(c)
            self.b_dec.div_(c)
            self.cfg = dataclasses.replace(self.cfg, code_l1=self.cfg.code_l1 / c**2)
            self.input_scale.fill_(1.0)
