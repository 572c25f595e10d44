import torch

from helpers import matrix_with_gap
from lightning_nusam.perturbations import batched_power_iteration, power_iteration


def test_converges_to_top_singular_pair_of_svd():
    a = matrix_with_gap(20, 9, [4.0, 2.0, 1.0, 0.5], seed=1)
    u0 = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    u, v, sigma = power_iteration(a, u0, iterations=60)
    left, values, right_t = torch.linalg.svd(a)
    torch.testing.assert_close(sigma, values[0], rtol=1e-10, atol=0)
    torch.testing.assert_close(torch.outer(u, v), torch.outer(left[:, 0], right_t[0]), rtol=0, atol=1e-10)


def test_single_iteration_is_algorithm_2_written_out():
    a = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    u0 = torch.randn(7, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tau = 1e-12
    v_expected = a.T @ u0 / ((a.T @ u0).norm() + tau)
    u_expected = a @ v_expected / ((a @ v_expected).norm() + tau)
    u, v, sigma = power_iteration(a, u0, iterations=1, tau=tau)
    torch.testing.assert_close(v, v_expected)
    torch.testing.assert_close(u, u_expected)
    torch.testing.assert_close(sigma, (a @ v_expected).norm())


def test_batched_equals_per_matrix_loop():
    generator = torch.Generator().manual_seed(5)
    stack = torch.randn(6, 11, 7, generator=generator)
    u0 = torch.randn(6, 11, generator=generator)
    u_b, v_b, s_b = batched_power_iteration(stack, u0, iterations=3)
    for i in range(6):
        u, v, s = power_iteration(stack[i], u0[i], iterations=3)
        torch.testing.assert_close(u_b[i], u, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v_b[i], v, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s_b[i], s, rtol=1e-6, atol=0)


def test_zero_matrix_gives_zero_vectors_not_nan():
    u, v, sigma = power_iteration(torch.zeros(4, 3), torch.ones(4) / 2)
    assert torch.equal(u, torch.zeros(4)) and torch.equal(v, torch.zeros(3)) and sigma == 0
    u, v, sigma = batched_power_iteration(torch.zeros(2, 4, 3), torch.ones(2, 4) / 2)
    assert torch.isfinite(u).all() and torch.isfinite(v).all() and (sigma == 0).all()
