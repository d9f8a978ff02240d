"""Truncated SVD of weight deltas: rank selection, exact and randomized solvers, errors.

Everything here works on one float32 matrix (a linear delta, or a conv delta
flattened to (out, in·k·k)) and returns factors plus the error they leave:

* rank modes: ``fixed`` (rank = param), ``ratio`` (σ > param·σ_max), ``energy``
  (smallest rank keeping that fraction of Σσ², LyCORIS calls it "quantile") and
  ``threshold`` (σ > param);
* solvers: ``exact`` (``torch.linalg.svd``), ``randomized`` (own range finder: Gaussian
  sketch, oversampling that grows with the rank, power iterations re-orthonormalised
  by QR at each step) and ``auto``, which decides up front (``auto_plan``): the exact
  ``factored`` solver when the caller passes low-rank factors M = U V with a small
  inner size (merge/convert/resize of LoRA, LoHa, LoKr), randomized when the rank is
  small against the matrix, exact otherwise.  A randomized result is kept only when a
  certificate proves its error is within ``AUTO_BOUND`` (1%) of the exact truncation
  error; otherwise auto falls back to the exact solver (and reports the fallback).

The certificate.  Let P = QQᵀ project on the randomized range (q columns), σ̂ᵢ the
singular values of PM and δ² = ‖(I−P)M‖_F² = ‖M‖² − ‖QᵀM‖² (exact and cheap).  The
cross terms of MᵀM = (PM)ᵀPM + ((I−P)M)ᵀ(I−P)M vanish, so by Ky Fan's inequality
Σ_{i≤r} σᵢ(M)² ≤ Σ_{i≤r} σ̂ᵢ² + δ², and the exact rank-r error satisfies
E_r² = ‖M‖² − Σ_{i≤r} σᵢ² ≥ ‖M‖² − Σ_{i≤r} σ̂ᵢ² − δ² =: L².  The randomized error E
(measured directly) is accepted when E ≤ (1 + bound)·L.  (This is tighter than the
Weyl bound Σ (σ̂ᵢ + δ)² used before, yet still rigorous.)
Errors are always measured as ‖M − UΣVᵀ‖_F on the returned factors, never estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RANK_MODES = ("fixed", "ratio", "energy", "threshold")
SVD_METHODS = ("auto", "exact", "randomized")
AUTO_BOUND = 0.01  # randomized error may exceed the exact truncation error by at most 1%
OVERSAMPLE = 10  # at least; oversampling(rank) grows it with the rank
POWER_ITERS = 4
FACTORED_SHARE = 0.5  # auto factors exactly when the stacked inner size R <= this x min(out, in)
AUTO_GUESS = 64  # columns first sampled when the rank is decided by the spectrum


@dataclass
class Truncation:
    """Rank-r factors of a matrix M ≈ up @ down, and what they leave out."""

    up: torch.Tensor  # (m, r): U·sqrt(Σ)
    down: torch.Tensor  # (r, n): sqrt(Σ)·Vᵀ
    rank: int
    kept_energy: float  # ‖UΣVᵀ‖²/‖M‖² (1.0 for a zero matrix)
    rel_error: float  # ‖M − UΣVᵀ‖_F / ‖M‖_F
    method: str  # "exact" | "randomized" | "factored" (exact SVD from low-rank factors)
    fallback: bool = False  # auto tried the randomized solver and its certificate failed


def check_mode(mode: str, param: float) -> None:
    if mode == "quantile":
        mode = "energy"
    if mode not in RANK_MODES:
        raise ValueError(f"rank mode must be one of {', '.join(RANK_MODES)}, not {mode!r}")
    if mode == "fixed" and (int(param) != param or param < 1):
        raise ValueError(f"fixed rank must be a positive integer, got {param}")
    if mode in ("ratio", "energy") and not 0 < param <= 1:
        raise ValueError(f"{mode} must be in (0, 1], got {param}")
    if mode == "threshold" and param < 0:
        raise ValueError(f"threshold must be >= 0, got {param}")


def choose_rank(s: torch.Tensor, mode: str, param: float, total_sq: float | None = None,
                max_rank: int | None = None) -> int:
    """Rank picked from singular values ``s`` (descending).

    ``total_sq`` is ‖M‖² when ``s`` is only the leading part of the spectrum.
    Always at least 1 and at most len(s) (and ``max_rank``).
    """
    if mode == "quantile":
        mode = "energy"
    n = int(s.numel())
    s64 = s.to(torch.float64)
    if mode == "fixed":
        r = int(param)
    elif mode == "ratio":
        r = int((s64 > param * float(s64[0])).sum()) if n else 0
    elif mode == "threshold":
        r = int((s64 > param).sum())
    elif mode == "energy":
        total = float((s64 * s64).sum()) if total_sq is None else total_sq
        if total <= 0:
            r = 1
        else:
            cum = torch.cumsum(s64 * s64, 0) / total
            # smallest r with cum[r-1] >= param; r = n when never reached
            reached = (cum >= param - 1e-12).nonzero()
            r = int(reached[0]) + 1 if len(reached) else n
    else:
        raise ValueError(f"unknown rank mode {mode!r}")
    if max_rank is not None:
        r = min(r, max_rank)
    return max(1, min(r, n))


def _sq(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)


def _finish(m: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int,
            total_sq: float, method: str) -> Truncation:
    root = s[:r].clamp_min(0).sqrt()
    up = (u[:, :r] * root).contiguous()
    down = (root[:, None] * vh[:r]).contiguous()
    err_sq = _sq(m - up @ down)
    rel = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    kept = min(1.0, _sq(s[:r]) / total_sq) if total_sq > 0 else 1.0
    return Truncation(up, down, r, kept, rel, method)


def exact_svd(m: torch.Tensor, mode: str, param: float, max_rank: int | None = None) -> Truncation:
    m = m.to(torch.float32)
    total_sq = _sq(m)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = choose_rank(s, mode, param, max_rank=max_rank)
    return _finish(m, u, s, vh, r, total_sq, "exact")


def oversampling(rank: int) -> int:
    """Extra sampled columns: grows with the rank (a cut inside a dense spectrum needs them)."""
    return max(OVERSAMPLE, rank // 2)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _randomized(m: torch.Tensor, q: int, niter: int, seed: int):
    """Randomized range finder with power iterations, re-orthonormalised (QR) at every step.

    Without the QRs, (MMᵀ)^k M Ω loses every direction below σ₁·ε^(1/(2k+1)) to float32
    rounding; with them each step keeps full accuracy.  Own generator: reproducible and the
    global RNG is left alone.
    """
    gen = torch.Generator().manual_seed(seed)
    rows, cols = m.shape
    omega = torch.randn(cols, q, generator=gen, dtype=m.dtype)
    basis = _orth(m @ omega)
    for _ in range(niter):
        basis = _orth(m @ _orth(m.mT @ basis))
    small = basis.mT @ m  # (q, cols)
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return basis @ ub, s, vh


def randomized_svd(m: torch.Tensor, mode: str, param: float, *, max_rank: int | None = None,
                   oversample: int | None = None, niter: int = POWER_ITERS, seed: int = 0,
                   certify: bool = False, bound: float = AUTO_BOUND) -> Truncation | None:
    """Randomized truncation; with ``certify`` returns None when it cannot be trusted.

    Without ``certify`` the result is always returned (its error is still measured).
    """
    m = m.to(torch.float32)
    small = min(m.shape)
    total_sq = _sq(m)
    if total_sq == 0:
        return exact_svd(m, mode, param, max_rank)
    target = int(param) if mode == "fixed" else AUTO_GUESS
    if max_rank is not None:
        target = min(target, max_rank)
    q = min(small, target + (oversampling(target) if oversample is None else oversample))
    u, s, vh = _randomized(m, q, niter, seed)
    captured = _sq(s)  # = ‖QᵀM‖² = ‖PM‖²
    r = choose_rank(s, mode, param, total_sq=total_sq, max_rank=max_rank)
    if certify and q < small and mode != "fixed":
        # the spectrum decides the rank: the q sampled values must reach past the cut
        saturated = (
            (mode == "energy" and captured < param * total_sq * (1 - 1e-9))
            or (mode in ("ratio", "threshold") and r >= q and (max_rank is None or r < max_rank))
        )
        if saturated:
            return None
    out = _finish(m, u, s, vh, r, total_sq, "randomized")
    if certify:
        # ‖M‖² = ‖PM‖² + ‖(I−P)M‖² and MᵀM = (PM)ᵀ(PM) + ((I−P)M)ᵀ((I−P)M) (the cross terms
        # vanish), so by Ky Fan Σ_{i≤r} σᵢ(M)² ≤ Σ_{i≤r} σ̂ᵢ² + ‖(I−P)M‖_F² and the exact
        # rank-r error is at least L² = ‖M‖² − Σ_{i≤r} σ̂ᵢ² − δ², δ² = ‖M‖² − ‖QᵀM‖².
        delta_sq = max(0.0, total_sq - captured)
        s64 = s[:r].to(torch.float64)
        lower_sq = total_sq - float((s64 * s64).sum()) - delta_sq
        err = out.rel_error * math.sqrt(total_sq)
        if err > 0 and (lower_sq <= 0 or err > (1 + bound) * math.sqrt(lower_sq)):
            # a near-exact answer (error ~ float32 noise) is accepted as it is
            if out.rel_error > 1e-5:
                return None
    return out


def factored_svd(m: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, mode: str, param: float,
                 max_rank: int | None = None) -> Truncation:
    """Exact truncated SVD of M = U V (U: m×R, V: R×n) in O((m+n)R² + R³).

    U = Q₁R₁, Vᵀ = Q₂R₂, R₁R₂ᵀ = XΣYᵀ (R×R) give M = (Q₁X) Σ (Q₂Y)ᵀ: the SVD of M itself, so
    its truncation is the optimal one.  The error is measured against ``m`` (the dense
    matrix) when given, else against U V rebuilt.
    """
    u, v = u.to(torch.float32), v.to(torch.float32)
    if m is None:
        m = u @ v
    m = m.to(torch.float32)
    total_sq = _sq(m)
    if total_sq == 0:
        return exact_svd(m, mode, param, max_rank)
    q1, r1 = torch.linalg.qr(u)
    q2, r2 = torch.linalg.qr(v.mT)
    x, s, yh = torch.linalg.svd(r1 @ r2.mT, full_matrices=False)
    # the spectrum beyond R is zero: choose_rank sees all of it (energy/ratio are exact)
    r = choose_rank(s, mode, param, max_rank=max_rank)
    return _finish(m, q1 @ x, s, yh @ q2.mT, r, total_sq, "factored")


def auto_plan(shape, mode: str, param: float, max_rank: int | None = None, inner: int | None = None) -> str:
    """What ``auto`` runs, decided up front: "factored", "randomized" or "exact".

    factored when the stacked factors' inner size R is at most FACTORED_SHARE × min(m, n)
    (exact, cheapest); randomized when the sample (rank + oversampling) is at most a third
    of min(m, n); exact otherwise.  Randomized still falls back to exact when its
    certificate fails (see the module docstring).
    """
    small = min(shape)
    if inner is not None and 0 < inner <= FACTORED_SHARE * small:
        return "factored"
    wanted = int(param) if mode == "fixed" else AUTO_GUESS
    if max_rank is not None:
        wanted = min(wanted, max_rank)
    if small < 64 or 3 * (wanted + oversampling(wanted)) > small:
        return "exact"
    return "randomized"


def truncate(m: torch.Tensor, mode: str = "fixed", param: float = 16, method: str = "auto", *,
             max_rank: int | None = None, seed: int = 0,
             factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> Truncation:
    """Truncated SVD of a 2-D matrix by the chosen solver (see module docstring).

    ``factors`` (U, V) with U @ V == m let ``auto`` take the exact factored solver when
    their inner size is small (see ``auto_plan``).
    """
    if m.dim() != 2:
        raise ValueError(f"truncate takes a matrix, got shape {tuple(m.shape)}")
    check_mode(mode, param)
    if mode == "quantile":
        mode = "energy"
    if method not in SVD_METHODS:
        raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, not {method!r}")
    if method == "exact":
        return exact_svd(m, mode, param, max_rank)
    if method == "randomized":
        return randomized_svd(m, mode, param, max_rank=max_rank, seed=seed)
    inner = None
    if factors is not None:
        u, v = factors
        if u.shape[0] != m.shape[0] or v.shape[1] != m.shape[1] or u.shape[1] != v.shape[0]:
            raise ValueError(f"factors {tuple(u.shape)} @ {tuple(v.shape)} do not make {tuple(m.shape)}")
        inner = u.shape[1]
    plan = auto_plan(m.shape, mode, param, max_rank, inner)
    if plan == "factored":
        return factored_svd(m, factors[0], factors[1], mode, param, max_rank)
    if plan == "exact":
        return exact_svd(m, mode, param, max_rank)
    out = randomized_svd(m, mode, param, max_rank=max_rank, seed=seed, certify=True)
    if out is None:
        out = exact_svd(m, mode, param, max_rank)
        out.fallback = True
    return out


# ---- convolutions ---------------------------------------------------------------------------

@dataclass
class TuckerTruncation:
    """k×k conv delta ≈ up (out, r_o) ×  mid (r_o, r_i, k, k) × down (r_i, in)."""

    up: torch.Tensor  # (out, r_o)
    mid: torch.Tensor  # (r_o, r_i, *kernel)
    down: torch.Tensor  # (r_i, in)
    rank: int  # r_i (the rank alpha refers to)
    kept_energy: float
    rel_error: float
    method: str
    fallback: bool = False


def tucker2(delta: torch.Tensor, mode: str = "fixed", param: float = 16, method: str = "auto", *,
            max_rank: int | None = None, hooi_iters: int = 2) -> TuckerTruncation:
    """Tucker-2 of a conv delta (out, in, k...) on its two channel modes.

    HOSVD initialises the factor bases from each unfolding's truncated SVD (the rank mode
    applies to each unfolding), then a few HOOI sweeps refine them; the core is the
    projection of the delta on both bases.  The error is measured on the rebuilt tensor.
    """
    d = delta.to(torch.float32)
    out_ch, in_ch = d.shape[:2]
    kernel = tuple(d.shape[2:])
    total_sq = _sq(d)
    unfold_out = d.reshape(out_ch, -1)
    unfold_in = d.transpose(0, 1).reshape(in_ch, -1)
    t_out = truncate(unfold_out, mode, param, method, max_rank=max_rank)
    t_in = truncate(unfold_in, mode, param, method, max_rank=max_rank)
    r_o, r_i = t_out.rank, t_in.rank
    u_out = torch.linalg.qr(t_out.up)[0] if r_o < out_ch else torch.eye(out_ch)
    u_in = torch.linalg.qr(t_in.up)[0] if r_i < in_ch else torch.eye(in_ch)
    full = r_o == out_ch and r_i == in_ch
    for _ in range(0 if full else hooi_iters):
        # best out-basis given the in-basis, then the other way round
        y = torch.einsum("oi...,ib->ob...", d, u_in).reshape(out_ch, -1)
        u_out = torch.linalg.svd(y, full_matrices=False)[0][:, :r_o]
        y = torch.einsum("oi...,oa->ia...", d, u_out).reshape(in_ch, -1)
        u_in = torch.linalg.svd(y, full_matrices=False)[0][:, :r_i]
    core = torch.einsum("oi...,oa,ib->ab...", d, u_out, u_in)
    rebuilt = torch.einsum("ab...,oa,ib->oi...", core, u_out, u_in)
    err_sq = _sq(d - rebuilt)
    rel = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    kept = min(1.0, _sq(core) / total_sq) if total_sq > 0 else 1.0
    used = "randomized" if "randomized" in (t_out.method, t_in.method) else "exact"
    return TuckerTruncation(u_out.contiguous(), core.reshape(r_o, r_i, *kernel).contiguous(),
                            u_in.T.contiguous(), r_i, kept, rel, used, t_out.fallback or t_in.fallback)
