"""MP-SAE: a matching-pursuit encoder over unit-norm decoder atoms (Costa et al. 2025).

Pursuit over atoms ``D = W_dec [n, d]`` for ``T`` steps: ``r₀ = x − b_dec``; for t = 1..T:
``j_t = argmax_i ⟨D_i, r_{t−1}⟩`` (or ``argmax |·|`` with ``absolute``), ``a_t = ⟨D_{j_t}, r_{t−1}⟩``,
``r_t = r_{t−1} − a_t D_{j_t}``. Decode ``x̂ = Σ_t a_t D_{j_t} + b_dec = x − r_T``. With unit atoms
``‖r_t‖² = ‖r_{t−1}‖² − a_t²``, so the residual never grows and T may change at inference.

Cost model (the point of this module). A naive pursuit recomputes ``r_t Dᵀ`` every step: T encoder GEMMs.
Here the correlations ``c = r Dᵀ [B, n]`` are computed once and updated with the Gram matrix
``G = D Dᵀ [n, n]``: ``c_t = c_{t−1} − a_t G[j_t]`` (exact for any D), so each step is O(n) per token.
The coefficient ``a_t`` itself is recomputed exactly from the true residual (O(d) per step), so the
reconstruction and the monotone residual hold to fp32 accuracy even when ``c₀``/``G`` come from a bf16
GEMM (under the trainer's ``autocast: bf16``). On CPU the T steps run in one numba kernel that keeps a
row's ``c`` in L1 (``backend='numba'``); elsewhere a torch loop over T (batched, no loop over samples).

Backward: the selection is piecewise constant, so ``a_t = ⟨D_{j_t}, r_{t−1}⟩`` is differentiated with the
chosen indices fixed — exactly what autograd through the unrolled loop gives — by a reverse sweep
(:class:`PursuitFn`) costing O(B·T·d): with ``ρ_t = ∂L/∂r_t`` (``ρ_T = 0``) and ``ā_t = ∂L/∂a_t``,
``s_t = ā_t − ⟨ρ_t, D_j⟩``, ``∂L/∂D_j += s_t r_{t−1} − a_t ρ_t``, ``ρ_{t−1} = ρ_t + s_t D_j``,
``∂L/∂r₀ = ρ₀``; residuals are rebuilt backwards (``r_{t−1} = r_t + a_t D_j``) instead of stored.

An atom picked twice is summed into its first entry and the later entry is zeroed, so codes stay
``[B, T]`` and L0 (nonzero values) counts distinct latents. ``orthogonal=True`` is OMP: the selected atoms
are never re-picked and the coefficients are the least-squares fit on the selected atoms (differentiable,
torch only, T correlation GEMMs — slow, for comparison). MP needs the decoder to be the encoder's atoms,
so an MP transcoder (target ≠ input) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparsedict.dictionaries.base import Dictionary, DictionaryConfig, Output, SparseCode, mse_loss, register
from sparsedict.dictionaries.topk import residual_variance
from sparsedict.kernels import sparse_decode
from sparsedict.kernels.pursuit import numba_available, pursuit_backward, pursuit_forward


@dataclass
class MPConfig(DictionaryConfig):
    architecture: str = "mp"
    """Registered architecture name."""
    steps: int = 32
    """Pursuit steps T (the maximum L0); can be changed at inference."""
    absolute: bool = False
    """Select by |⟨D_i, r⟩| (classic MP, codes of both signs) instead of the signed max (overcomplete)."""
    orthogonal: bool = False
    """Orthogonal MP: least-squares coefficients on the selected atoms after every step (slow; torch)."""
    init_atoms: str = "data"
    """'data': atoms start as normalised rows of the (centred) init sample; 'random': Gaussian directions."""
    b_dec_init: str = "mean"
    """How to initialise b_dec from data: 'mean' (best measured for MP-SAE), 'median' or 'zero'."""
    aux_k: int = 32
    """Dead atoms used by the revival loss (AuxK analogue on the final residual; 0 turns it off)."""
    aux_alpha: float = 1 / 32
    """Weight of the revival loss."""
    backend: str = "auto"
    """'auto' (numba kernel on CPU when installed, torch otherwise), 'numba' or 'torch'."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"MP steps must be >= 1, got {self.steps}")
        if self.init_atoms not in ("data", "random"):
            raise ValueError(f"init_atoms must be 'data' or 'random', not {self.init_atoms!r}")
        if self.backend not in ("auto", "numba", "torch"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'torch', not {self.backend!r}")


class PursuitFn(torch.autograd.Function):
    """``a = PursuitFn.apply(r0, D, a_fixed, idx, rT)``: attaches the pursuit coefficients to the graph.

    ``r0 [B, d]``, ``D [n, d]``, ``a_fixed [B, T]`` (computed by the pursuit, no grad), ``idx [B, T]``,
    ``rT [B, d]`` the final residual. Forward returns a copy of ``a_fixed``; backward is the reverse
    sweep described in the module docstring (gradients wrt ``r0`` and ``D``).
    """

    @staticmethod
    def forward(ctx, r0: Tensor, D: Tensor, a: Tensor, idx: Tensor, rT: Tensor, use_numba: bool) -> Tensor:
        ctx.save_for_backward(D, a, idx, rT)
        ctx.use_numba = use_numba
        return a.clone()

    @staticmethod
    def backward(ctx, grad_a: Tensor):
        D, a, idx, rT = ctx.saved_tensors
        d_r0, d_D = pursuit_backward(grad_a.contiguous(), D, a, idx, rT, ctx.use_numba)
        return d_r0, d_D, None, None, None, None


@register("mp", MPConfig)
class MP(Dictionary):
    """Matching-pursuit SAE. Parameters: ``W_dec [n, d]`` (unit-norm atoms) and ``b_dec [d]``; no encoder."""

    cfg: MPConfig
    supports_transcoder = False
    sparsity_fields = ("steps",)

    def __init__(self, cfg: MPConfig):
        if cfg.is_transcoder or (cfg.d_out and cfg.d_out != cfg.d_in) or cfg.skip:
            raise ValueError(
                "MP-SAE cannot be a transcoder or have a skip connection: matching pursuit selects and decodes "
                "with the same atoms, so the target must be the input. Train an SAE (no 'target', skip=false), "
                "or use a TopK/BatchTopK transcoder for input -> target maps."
            )
        super().__init__(cfg)

    def _init_encoder(self, w_dec: Tensor) -> None:
        """The encoder is the pursuit over W_dec: no W_enc / b_enc parameters."""
        self.register_parameter("W_enc", None)
        self.register_parameter("b_enc", None)

    # -- pursuit ------------------------------------------------------------------------------------
    def _use_numba(self, t: Tensor) -> bool:
        if self.cfg.backend == "torch" or t.device.type != "cpu":
            return False
        if self.cfg.backend == "numba" and not numba_available():
            raise ImportError(
                "MP backend 'numba' needs the numba package: pip install numba (or backend: torch)"
            )
        return numba_available()

    def pursue(self, x: Tensor, steps: int | None = None, keep_corr: bool = False):
        """Run the pursuit on ``x [B, d]``. Returns ``(code, rT [B, d], cT [B, n] or None)``.

        ``code.values``/``code.indices`` are ``[B, T]`` with duplicates merged into their first entry.
        Differentiable wrt ``W_dec`` and ``b_dec`` (and ``x``) when grad is enabled.
        """
        self.check_input(x)
        T = steps or self.cfg.steps
        D = self.W_dec
        r0 = x - self.b_dec if self.subtracts_b_dec else x
        if self.cfg.orthogonal:
            return self._omp(r0, T)
        dt = torch.float64 if D.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            r0d, Dd = r0.detach().to(dt).contiguous(), D.detach().to(dt).contiguous()
            c = r0.detach() @ D.detach().T  # bf16 GEMMs under the trainer's autocast
            G = D.detach() @ D.detach().T
            use_numba = self._use_numba(x)
            if not (use_numba and c.dtype == G.dtype == torch.bfloat16 and dt == torch.float32):
                c, G = c.to(dt), G.to(dt)  # (the numba kernel reads bf16 c and G as they are)
            a, idx, first, rT, c = pursuit_forward(
                r0d, Dd, c.contiguous(), G.contiguous(), T, self.cfg.absolute, use_numba
            )
        if torch.is_grad_enabled() and (D.requires_grad or r0.requires_grad):
            a = PursuitFn.apply(r0.to(dt), D.to(dt), a, idx, rT, use_numba)
        values = torch.zeros_like(a).scatter_add(1, first, a)  # merge repeated atoms into the first entry
        return SparseCode(values, idx, self.n_latents), rT, (c if keep_corr else None)

    def _omp(self, r0: Tensor, T: int):
        """Orthogonal MP: greedy selection (no re-picks), least-squares coefficients on the support."""
        B, n = r0.shape[0], self.n_latents
        D = self.W_dec
        dt = torch.float64 if D.dtype == torch.float64 else torch.float32
        idx = torch.empty(B, 0, dtype=torch.long, device=r0.device)
        with torch.no_grad():
            Dd, r0d = D.detach().to(dt), r0.detach().to(dt)
            picked = torch.zeros(B, n, dtype=torch.bool, device=r0.device)
            r = r0d
            for _ in range(T):
                c = r @ Dd.T
                score = (c.abs() if self.cfg.absolute else c).masked_fill(picked, float("-inf"))
                j = score.argmax(1, keepdim=True)
                picked.scatter_(1, j, True)
                idx = torch.cat([idx, j], 1)
                z = _least_squares(Dd[idx], r0d)
                r = r0d - torch.einsum("bt,btd->bd", z, Dd[idx])
        z = _least_squares(D.to(dt)[idx], r0.to(dt))
        rT = (r0.to(dt) - torch.einsum("bt,btd->bd", z, D.to(dt)[idx])).detach()
        return SparseCode(z, idx, n), rT, None

    def encode(self, x: Tensor) -> SparseCode:
        return self.pursue(x)[0]

    def forward(self, x: Tensor, target: Tensor | None = None) -> Output:
        if target is not None and target is not x and target.shape != x.shape:
            raise ValueError(
                "MP-SAE reconstructs its input; a different target needs a transcoder architecture"
            )
        dead = self._dead_mask
        want_aux = self.training and self.cfg.aux_alpha > 0 and self.cfg.aux_k > 0 and dead is not None
        want_aux = want_aux and bool(dead.any()) and not self.cfg.orthogonal
        code, _, cT = self.pursue(x, keep_corr=want_aux)
        x_hat = self.decode(code)
        losses = {"mse": mse_loss(x_hat, x)}
        if want_aux:
            losses["revival"] = self._revival_loss(x, x_hat, cT, dead)
        return Output(x_hat, code, losses)

    def _revival_loss(self, x: Tensor, x_hat: Tensor, cT: Tensor, dead: Tensor) -> Tensor:
        """AuxK analogue: the dead atoms most correlated with the final residual try to explain it.

        ``e = x − x̂`` (detached); ``j`` = top-``aux_k`` dead atoms by ``c_T`` (the pursuit's final
        correlations, no extra GEMM); ``ê = Σ relu(⟨D_j, e⟩) D_j`` (no b_dec);
        ``α ‖e − ê‖² / Σ‖e − ē‖²``. Gradient reaches the dead atoms only.
        """
        e = (x - x_hat).detach().float()
        score = cT.masked_fill(~dead.to(cT.device)[None, :], float("-inf"))
        k = min(self.cfg.aux_k, int(dead.sum()))
        j = score.topk(k, dim=1, sorted=False).indices
        vals = torch.einsum("bkd,bd->bk", self.W_dec[j].float(), e).relu()
        e_hat = sparse_decode(j, vals, self.W_dec)
        return self.cfg.aux_alpha * (e_hat.float() - e).pow(2).sum(-1).mean() / residual_variance(e)

    # -- initialisation and scaling -------------------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor, y: Tensor | None = None) -> None:
        """b_dec from the sample (``b_dec_init``), then atoms from centred sample rows if ``init_atoms='data'``."""
        super().init_from_data(x, None)
        if self.cfg.init_atoms == "data":
            rows = (
                torch.randint(0, x.shape[0], (self.n_latents,))
                if x.shape[0] < self.n_latents
                else torch.randperm(x.shape[0])[: self.n_latents]
            )
            atoms = (x[rows.to(x.device)] - self.b_dec).to(self.W_dec.dtype)
            atoms = atoms + 1e-6 * torch.randn_like(atoms)  # no zero rows, no exact duplicates
            self.W_dec.copy_(atoms / atoms.norm(dim=1, keepdim=True))

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Fold ``input_scale`` c: atoms stay unit-norm, ``b_dec /= c``; codes on raw inputs scale by 1/c."""
        c = float(self.input_scale)
        if c != 1.0:
            self.b_dec.div_(c)
            self.input_scale.fill_(1.0)


def _least_squares(Ds: Tensor, r0: Tensor) -> Tensor:
    """Batched ``argmin_z ‖r0 − z Ds‖²``: ``Ds [B, t, d]``, ``r0 [B, d]`` -> ``z [B, t]`` (tiny ridge: 1e-6 fp32, 1e-12 fp64)."""
    ridge = 1e-12 if Ds.dtype == torch.float64 else 1e-6
    gram = Ds @ Ds.transpose(1, 2)
    gram = gram + ridge * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = torch.einsum("btd,bd->bt", Ds, r0)
    return torch.linalg.solve(gram, rhs.unsqueeze(-1)).squeeze(-1)
