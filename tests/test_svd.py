"""Truncated SVD: rank modes, exact/randomized/auto solvers, measured errors, Tucker-2."""

import math

import pytest
import torch

from lycoris_core.svd import choose_rank, exact_svd, randomized_svd, truncate, tucker2


def _spectrum_matrix(sigmas, m=200, n=150, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(sigmas), generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, len(sigmas), generator=gen))[0]
    return (u * torch.tensor(sigmas)) @ v.T


def test_choose_rank_modes():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, "fixed", 3) == 3
    assert choose_rank(s, "fixed", 99) == 5
    assert choose_rank(s, "ratio", 0.15) == 3  # > 1.5
    assert choose_rank(s, "threshold", 1.0) == 3  # > 1.0
    total = float((s * s).sum())
    assert choose_rank(s, "energy", 100 / total) == 1
    assert choose_rank(s, "energy", 125 / total) == 2
    assert choose_rank(s, "energy", 1.0) == 5
    assert choose_rank(s, "threshold", 100) == 1  # never below 1


def test_exact_error_is_the_tail():
    sig = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    m = _spectrum_matrix(sig)
    t = exact_svd(m, "fixed", 3)
    tail = math.sqrt(sum(x * x for x in sig[3:]) / sum(x * x for x in sig))
    assert t.rank == 3 and t.rel_error == pytest.approx(tail, rel=1e-4)
    measured = float((m - t.up @ t.down).norm() / m.norm())
    assert t.rel_error == pytest.approx(measured, rel=1e-6)


def test_randomized_close_to_exact_on_decaying_spectrum():
    sig = [0.9 ** i for i in range(150)]
    m = _spectrum_matrix(sig, 400, 300)
    exact = exact_svd(m, "fixed", 16)
    rand = randomized_svd(m, "fixed", 16)
    assert rand.rel_error <= exact.rel_error * 1.01
    auto = truncate(m, "fixed", 16, "auto")
    assert auto.rel_error <= exact.rel_error * 1.01


def test_auto_takes_randomized_on_low_rank_and_falls_back_on_flat():
    low = _spectrum_matrix([5.0, 4.0, 3.0, 2.0, 1.0], 300, 300)
    t = truncate(low, "fixed", 8, "auto")
    assert t.method == "randomized" and not t.fallback and t.rel_error < 1e-5
    flat = torch.randn(300, 300, generator=torch.Generator().manual_seed(1))
    t = truncate(flat, "fixed", 8, "auto")
    assert t.method == "exact" and t.fallback  # certificate cannot hold on a flat spectrum
    assert t.rel_error == pytest.approx(exact_svd(flat, "fixed", 8).rel_error, rel=1e-5)


def test_spectrum_modes_under_auto():
    sig = [2.0 ** -i for i in range(40)]
    m = _spectrum_matrix(sig, 300, 280)
    for mode, param in (("ratio", 0.01), ("energy", 0.999), ("threshold", 0.05)):
        a = truncate(m, mode, param, "auto")
        e = truncate(m, mode, param, "exact")
        assert a.rank == e.rank
        assert a.rel_error <= e.rel_error * 1.01 + 1e-6


def test_tucker2_full_rank_is_exact_and_reports_measured_error():
    gen = torch.Generator().manual_seed(2)
    d = torch.randn(16, 12, 3, 3, generator=gen)
    t = tucker2(d, "fixed", 64, "exact")
    rebuilt = torch.einsum("ab...,oa,bi->oi...", t.mid, t.up, t.down)
    assert float((rebuilt - d).norm() / d.norm()) < 1e-5
    t = tucker2(d, "fixed", 4, "exact")
    rebuilt = torch.einsum("ab...,oa,bi->oi...", t.mid, t.up, t.down)
    assert t.rel_error == pytest.approx(float((rebuilt - d).norm() / d.norm()), rel=1e-5)
    assert t.mid.shape == (4, 4, 3, 3)
