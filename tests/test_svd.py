"""Truncated SVD: rank modes, exact/randomized/auto solvers, measured errors, Tucker-2."""

import math

import pytest
import torch

from lycoris_core.tools.svd import auto_plan, choose_rank, exact_svd, factored_svd, randomized_svd, truncate, tucker2


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


# ---- exact factored SVD from low-rank factors ------------------------------------------------

FACTOR_SELECT = {"conv_in", "down_blocks.0.attentions.0.proj_in",
                 "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
                 "text_model.encoder.layers.0.self_attn.q_proj"}


@pytest.mark.parametrize("algo,options", [("lora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"full_w2": True}),
                                          ("lokr", {"factor": 4}), ("locon_tucker", {}), ("loha_tucker", {}),
                                          ("dora", {})])
def test_low_rank_factors_rebuild_delta(tmp_path, algo, options):
    from safetensors.torch import save_file

    from lycoris_core.adapter import load_adapter
    from lycoris_core.testing.synthetic import synthetic_adapter

    path = tmp_path / "a.safetensors"
    save_file(synthetic_adapter("sd1", algo, select=lambda s: s.name in FACTOR_SELECT, rank=4,
                                dtype=torch.float32, seed=1, **options), str(path))
    seen = 0
    for module in load_adapter(str(path)).modules.values():
        factors = module.low_rank_factors()
        if module.tucker or module.dora:
            assert factors is None  # Tucker conv forms and DoRA take the dense path
            continue
        u, v = factors
        delta = module.delta().reshape(module.shape[0], -1)
        assert float((u @ v - delta).norm() / delta.norm()) < 1e-5
        seen += 1
    assert seen or algo in ("dora",)


def test_factored_svd_is_exact_and_auto_uses_it():
    gen = torch.Generator().manual_seed(3)
    u, v = torch.randn(500, 24, generator=gen), torch.randn(24, 700, generator=gen)
    m = u @ v
    ref = exact_svd(m, "fixed", 10)
    for t in (factored_svd(m, u, v, "fixed", 10), truncate(m, "fixed", 10, "auto", factors=(u, v))):
        assert t.method == "factored" and t.rank == 10
        assert t.rel_error == pytest.approx(ref.rel_error, rel=1e-4)
        assert t.rel_error == pytest.approx(float((m - t.up @ t.down).norm() / m.norm()), rel=1e-5)
    for mode, param in (("energy", 0.9), ("ratio", 0.2), ("threshold", 50.0)):
        assert factored_svd(m, u, v, mode, param).rank == exact_svd(m, mode, param).rank
    # rank above the factors' inner size: exact reconstruction
    assert factored_svd(m, u, v, "fixed", 64).rel_error < 1e-5
    # inner size too large for the factored solver: auto decides up front for another one
    assert auto_plan((100, 100), "fixed", 8, None, 80) != "factored"
    assert auto_plan((100, 100), "fixed", 8, None, 40) == "factored"


def test_randomized_is_within_one_percent_on_a_hadamard_spectrum():
    # a LoHa-like delta: dense slowly decaying spectrum, the hard case for a randomized solver
    gen = torch.Generator().manual_seed(4)
    a1, b1, a2, b2 = (torch.randn(*s, generator=gen) for s in ((400, 16), (16, 300), (400, 16), (16, 300)))
    m = (a1 @ b1) * (a2 @ b2)
    for r in (16, 32):
        assert randomized_svd(m, "fixed", r).rel_error <= exact_svd(m, "fixed", r).rel_error * 1.01
