"""Statistical checks shared by the estimator tests.

``assert_unbiased`` tests H0: E[estimate] = exact from K independent draws with Hotelling's T^2
on d fixed linear functionals of the estimate (the exact-gradient direction, for power against
a scale bias, plus seeded random directions). The sample covariance of the draws accounts for
the correlation between elements, so under H0 (K - r) / (r (K - 1)) T^2 ~ F(r, K - r), r the
rank of that covariance, and the test rejects at level ``alpha``. Directions along which the
draws do not vary at all must match the exact value to float tolerance.
"""

from __future__ import annotations

import torch
from scipy import stats


def unbiasedness_pvalue(samples: torch.Tensor, exact: torch.Tensor, directions: int = 16) -> float:
    """p-value of H0: E[samples[k]] = exact (samples: K x ..., exact: ...)."""
    draws = samples.double().flatten(1)
    target = exact.double().flatten()
    k, p = draws.shape
    gen = torch.Generator().manual_seed(0)
    random_dirs = torch.randn(p, min(directions, p) - 1, generator=gen, dtype=torch.float64)
    basis = torch.cat([target[:, None], random_dirs], dim=1)
    basis = basis / basis.norm(dim=0).clamp_min(1e-300)
    proj = draws @ basis
    diff = proj.mean(0) - target @ basis
    evals, evecs = torch.linalg.eigh(torch.cov(proj.T).reshape(basis.shape[1], -1))
    noisy = evals > 1e-10 * evals.max().clamp_min(1e-300)
    still = evecs[:, ~noisy].T @ diff
    scale = target.norm().item() + 1e-300
    if still.numel() and still.abs().max().item() > 1e-7 * scale:
        return 0.0  # the estimate is deterministic along a direction and wrong there
    r = int(noisy.sum())
    if r == 0:
        return 1.0
    t2 = k * ((evecs[:, noisy].T @ diff) ** 2 / evals[noisy]).sum().item()
    return float(stats.f.sf((k - r) / (r * (k - 1)) * t2, r, k - r))


def assert_unbiased(samples: torch.Tensor, exact: torch.Tensor, alpha: float = 1e-4) -> None:
    """Fail if the draws in ``samples`` (K x ...) are inconsistent with mean ``exact``."""
    std = samples.double().std(0)
    assert std.max().item() > 0, "the estimator had no variance: nothing random was tested"
    pvalue = unbiasedness_pvalue(samples, exact)
    assert pvalue > alpha, f"biased: Hotelling T^2 p-value {pvalue:.2e} < {alpha}"


def scale_ratio(samples: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error over the K draws of r_k = <g_k, g> / |g|^2 (g = ``exact``); an
    unbiased estimator has E[r] = 1, one off in scale by a factor c has E[r] = c."""
    draws = samples.double().flatten(1)
    target = exact.double().flatten()
    ratio = draws @ target / target.dot(target)
    return ratio.mean().item(), ratio.std().item() / len(ratio) ** 0.5


def assert_no_scale_bias(
    samples: torch.Tensor, exact: torch.Tensor, resolve: float | None = None, z: float = 4.5
) -> None:
    """Fail if the mean ratio of :func:`scale_ratio` is more than ``z`` standard errors from 1.
    With ``resolve``, also fail unless the check rejects a scale error of that relative size
    with margin (its standard error at most resolve / (z + 3))."""
    mean, se = scale_ratio(samples, exact)
    assert abs(mean - 1) <= z * se, (
        f"scale bias: mean ratio {mean:.4f}, {abs(mean - 1) / se:.1f} s.e. from 1"
    )
    if resolve is not None:
        assert se <= resolve / (z + 3), (
            f"too few draws to resolve a {resolve:.0%} scale error: s.e. {se:.4f}"
        )
