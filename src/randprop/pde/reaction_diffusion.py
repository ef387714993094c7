"""A 2D linear reaction-diffusion control problem (RAD paper, Oktay et al., 2020, section 5).

Model (one-group neutron diffusion in a square reactor core, a fission-reactor toy):

    du/dt = D (u_xx + u_yy) + k(x, y; theta) u    on (0, 1)^2, t in (0, T],
    u = 0 on the boundary (Dirichlet),   u(x, y, 0) = sin(pi x) sin(pi y),

with reaction coefficient k(x, y; theta) = theta_0 + sum_{j=1..6} theta_j phi_j(x, y): a uniform
level plus six Gaussian bumps phi_j = exp(-|z - c_j|^2 / (2 w^2)) (control rods) at centres c_j
on a 3 x 2 lattice. So there are 7 control parameters.

Discretisation: a (grid x grid) node lattice (33 x 33 by default), h = 1 / (grid - 1); the
unknowns are the (grid - 2)^2 interior nodes (the boundary stays 0). Explicit Euler with the
5-point Laplacian and dt = T / steps:

    u^{n+1} = A u^n,   A = I + dt D L_h + dt diag(k).

It is stable (monotone) when c = D dt / h^2 satisfies 4 c - dt min(k, 0) <= 1; the default
D = 0.05, T = 1 gives c = 0.005 at 40,960 steps, and needs at least 205 steps for k >= 0.
Without reaction, the eigenmode sin(a pi x) sin(b pi y) decays by exactly
(1 - 4 c (sin^2(a pi h / 2) + sin^2(b pi h / 2)))^n after n steps, and the continuous solution
by exp(-(a^2 + b^2) pi^2 D t).

Reverse mode (adjoint): with lambda^N = dJ/du^N + dt dJ/dI and, for the time integral
I = dt sum_{n=1..N} u^n, lambda^n = A^T lambda^{n+1} + dt dJ/dI (n >= 1),

    dJ/dk = dt sum_{n=0..N-1} lambda^{n+1} * u^n,   dJ/du^0 = A^T lambda^1.

The adjoint recursion never reads u (the PDE is linear), so u^n is needed only in dJ/dk:

- exact: every state u^0..u^{N-1} is stored;
- checkpoint: every s-th state is stored (s = ceil(sqrt(N)) by default) and each segment is
  recomputed in backward (s more states held while it runs);
- rad: a random fraction p of each state is stored: k_p = ceil(p n^2) of the n^2 interior values,
  drawn without replacement and scaled by n^2 / k_p, so E[u_hat^n] = u^n and dJ/dk is unbiased.
  Index sets come from seeds derive_seed(seed, chunk), regenerated in backward.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from randprop import random as rnd
from randprop.config import check_choice, check_fraction

GRADIENTS = ("exact", "checkpoint", "rad")
OBJECTIVES = ("final", "integral")
CHUNK = 256  # steps per block of random index sets (and per RAD scatter)


@dataclasses.dataclass(frozen=True)
class ReactionDiffusion:
    """The problem: grid nodes per side, diffusion D, horizon T, number of explicit steps."""

    grid: int = 33
    diffusion: float = 0.05
    horizon: float = 1.0
    steps: int = 40_960
    width: float = 0.12

    def __post_init__(self) -> None:
        if not (isinstance(self.grid, int) and self.grid >= 3):
            raise ValueError(f"grid must be an integer >= 3; got {self.grid!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be a positive integer; got {self.steps!r}")
        for name in ("diffusion", "horizon", "width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)!r}")
        if 4 * self.courant > 1:
            least = math.ceil(4 * self.diffusion * self.horizon / self.h**2)
            raise ValueError(
                f"steps={self.steps} is unstable for the explicit scheme (4 D dt / h^2 = "
                f"{4 * self.courant:.3g} > 1); use steps >= {least}"
            )

    @property
    def h(self) -> float:
        return 1.0 / (self.grid - 1)

    @property
    def dt(self) -> float:
        return self.horizon / self.steps

    @property
    def courant(self) -> float:
        """c = D dt / h^2."""
        return self.diffusion * self.dt / self.h**2

    @property
    def interior(self) -> int:
        return self.grid - 2

    def coords(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the interior nodes, each (n, n) with n = grid - 2 (x along the last axis)."""
        z = torch.arange(1, self.grid - 1, dtype=dtype) * self.h
        y, x = torch.meshgrid(z, z, indexing="ij")
        return x, y

    def basis(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """phi_0..phi_6 on the interior nodes: (7, n, n)."""
        x, y = self.coords(dtype)
        bumps = [torch.ones_like(x)]
        for cy in (0.3, 0.7):
            for cx in (0.25, 0.5, 0.75):
                bumps.append(torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * self.width**2)))
        return torch.stack(bumps)

    def reaction(self, theta: torch.Tensor) -> torch.Tensor:
        """k(x, y; theta) for theta (..., 7): (..., n, n)."""
        if theta.shape[-1] != 7:
            raise ValueError(f"theta must have 7 entries in its last dimension; got {theta.shape}")
        return torch.einsum("...j,jyx->...yx", theta, self.basis(theta.dtype).to(theta.device))

    def initial(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """u^0 = sin(pi x) sin(pi y) on the interior: (n, n)."""
        x, y = self.coords(dtype)
        return torch.sin(math.pi * x) * torch.sin(math.pi * y)


@dataclasses.dataclass(frozen=True)
class Storage:
    """How the reverse pass gets u^n: "exact", "checkpoint" (every ``segment``-th state; None for
    ceil(sqrt(steps))) or "rad" (a fraction ``keep`` of each state, drawn with ``seed``)."""

    gradient: str = "exact"
    keep: float = 1.0
    segment: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("pde", "gradient", self.gradient, GRADIENTS)
        check_fraction("pde", "keep", self.keep)
        if self.segment is not None and not (isinstance(self.segment, int) and self.segment >= 1):
            raise ValueError(
                f"pde: segment must be a positive integer or None; got {self.segment!r}"
            )


class _Stepper:
    """u -> A u (A symmetric up to the diagonal reaction, so A^T = A) for (B, n, n) fields."""

    def __init__(self, problem: ReactionDiffusion, k: torch.Tensor, batch: int) -> None:
        c = problem.courant
        self.dtk = problem.dt * k
        self.batch = batch
        n = problem.interior
        self.c = c
        if batch <= 2:  # a depthwise convolution is fastest for one or two fields
            w = k.new_tensor([[0, c, 0], [c, 1 - 4 * c, c], [0, c, 0]])
            self.weight = w.expand(batch, 1, 3, 3).contiguous()
            self.smooth = self._conv
        else:  # shifted slices of a zero-padded copy scale better with the batch
            self.pad = k.new_zeros(batch, n + 2, n + 2)
            self.smooth = self._slices

    def _conv(self, u: torch.Tensor) -> torch.Tensor:
        return F.conv2d(u.unsqueeze(0), self.weight, padding=1, groups=self.batch).squeeze(0)

    def _slices(self, u: torch.Tensor) -> torch.Tensor:
        p = self.pad
        p[:, 1:-1, 1:-1] = u
        lap = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
        return lap.sub_(u, alpha=4).mul_(self.c).add_(u)

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """(I + dt D L_h) u + dt k u."""
        return torch.addcmul(self.smooth(u), self.dtk, u)


def _indices(storage: Storage, chunk: int, shape: tuple[int, int], n2: int, device):
    """The kept positions of the states of one chunk: (steps in chunk, B, k_p)."""
    gen = rnd.generator(rnd.derive_seed(storage.seed, chunk), device)
    k = rnd.kept_count(n2, storage.keep)
    return rnd.sample_indices(n2, k, gen, device, batch_shape=shape)


class _SolveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u0, k, problem: ReactionDiffusion, storage: Storage):
        batch, n, _ = u0.shape
        steps, n2, mode = problem.steps, n * n, storage.gradient
        k = k.expand(batch, n, n)
        step = _Stepper(problem, k, batch)
        seg = storage.segment or math.ceil(math.sqrt(steps))
        chunk = seg if mode == "checkpoint" else CHUNK
        kept = rnd.kept_count(n2, storage.keep)
        if mode == "exact":
            saved = u0.new_empty(steps, batch, n2)
        elif mode == "checkpoint":
            saved = u0.new_empty(math.ceil(steps / chunk), batch, n2)
        else:
            saved = u0.new_empty(steps, batch, kept)
        u, integral = u0, torch.zeros_like(u0)
        for c, start in enumerate(range(0, steps, chunk)):
            stop = min(start + chunk, steps)
            if mode == "checkpoint":
                saved[c] = u.reshape(batch, n2)
            block = saved[start:stop] if mode == "exact" else u0.new_empty(stop - start, batch, n2)
            for j in range(stop - start):
                if mode != "checkpoint":
                    block[j] = u.reshape(batch, n2)
                u = step(u)
                integral.add_(u)
            if mode == "rad":
                idx = _indices(storage, c, (stop - start, batch), n2, u0.device)
                saved[start:stop] = block.gather(-1, idx)
        ctx.save_for_backward(saved, k)
        ctx.setup = (problem, storage, chunk, kept, k.shape)
        return u, integral * problem.dt

    @staticmethod
    def backward(ctx, grad_final, grad_integral):
        saved, k = ctx.saved_tensors
        problem, storage, chunk, kept, shape = ctx.setup
        batch, n, _ = shape
        steps, n2, dt, mode = problem.steps, n * n, problem.dt, storage.gradient
        step = _Stepper(problem, k, batch)
        source = dt * grad_integral
        lam = grad_final + source  # lambda^N
        has_source = bool(grad_integral.any())
        grad_k = torch.zeros(batch, n2, dtype=k.dtype, device=k.device)
        starts = list(range(0, steps, chunk))
        for c in reversed(range(len(starts))):
            start, stop = starts[c], min(starts[c] + chunk, steps)
            lams = k.new_empty(stop - start, batch, n2)  # lambda^{j+1} for the chunk's steps j
            for j in reversed(range(start, stop)):
                lams[j - start] = lam.reshape(batch, n2)
                lam = step(lam)
                if j > 0 and has_source:
                    lam = lam + source
            if mode == "exact":
                grad_k += (lams * saved[start:stop]).sum(0)
            elif mode == "checkpoint":
                grad_k += (lams * _recompute(step, saved[c], stop - start, shape)).sum(0)
            else:
                idx = _indices(storage, c, (stop - start, batch), n2, k.device)
                terms = lams.gather(-1, idx) * saved[start:stop] * (n2 / kept)
                grad_k.scatter_add_(-1, _flat(idx), _flat(terms))
        return lam, (dt * grad_k).view(shape), None, None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(steps, B, m) -> (B, steps * m)."""
    return t.transpose(0, 1).reshape(t.shape[1], -1)


def _recompute(step: _Stepper, start: torch.Tensor, count: int, shape) -> torch.Tensor:
    """The states u^j .. u^{j+count-1} from the checkpoint u^j: (count, B, n^2)."""
    batch, n, _ = shape
    states = start.new_empty(count, batch, n * n)
    u = start.view(batch, n, n)
    for j in range(count):
        states[j] = u.reshape(batch, n * n)
        u = step(u)
    return states


def solve(
    problem: ReactionDiffusion,
    k: torch.Tensor,
    u0: torch.Tensor | None = None,
    storage: Storage | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate to t = T: (u^N, I = dt sum_{n=1..N} u^n), each (B, n, n) (or (n, n)).

    k: reaction coefficient (n, n) or (B, n, n); u0: initial field, default
    ``problem.initial()``. Gradients flow to k and u0 by the adjoint, with the states for
    dJ/dk kept as ``storage`` says (default exact).
    """
    n = problem.interior
    storage = storage or Storage()
    if u0 is None:
        u0 = problem.initial(k.dtype).to(k.device)
    if k.shape[-2:] != (n, n) or u0.shape[-2:] != (n, n):
        raise ValueError(f"k and u0 must end in ({n}, {n}); got {k.shape} and {u0.shape}")
    unbatched = k.dim() == 2 and u0.dim() == 2
    k3, u3 = k.reshape(-1, n, n), u0.reshape(-1, n, n)
    batch = max(k3.shape[0], u3.shape[0])
    if k3.shape[0] not in (1, batch) or u3.shape[0] not in (1, batch):
        raise ValueError(f"k and u0 batch sizes differ: {k.shape} vs {u0.shape}")
    min_k = k.detach().min().item()
    if 4 * problem.courant - problem.dt * min(min_k, 0.0) > 1:
        raise ValueError(f"steps={problem.steps} too few for a stable step with min(k)={min_k:.3g}")
    final, integral = _SolveFn.apply(u3.expand(batch, n, n), k3, problem, storage)
    return (final[0], integral[0]) if unbatched else (final, integral)


def objective(
    field: torch.Tensor, target: torch.Tensor, problem: ReactionDiffusion
) -> torch.Tensor:
    """J = (1/2) h^2 |field - target|^2 / ((1/2) h^2 |target|^2), per batch entry."""
    dims = (-2, -1)
    return ((field - target) ** 2).sum(dims) / (target**2).sum(dims)


THETA_TARGET = (1.0, 1.5, -1.0, 0.5, -0.5, 1.0, -1.5)


class ControlProblem:
    """Fit theta so that the final (or time-integrated) field matches the one made by
    THETA_TARGET: loss(theta) = objective(field(theta), field(theta_target))."""

    def __init__(self, problem: ReactionDiffusion, kind: str = "final") -> None:
        check_choice("pde", "objective", kind, OBJECTIVES)
        self.problem, self.kind = problem, kind
        with torch.no_grad():
            target = torch.tensor(THETA_TARGET, dtype=torch.float64)
            self.target = self.field(target, Storage())

    def field(self, theta: torch.Tensor, storage: Storage) -> torch.Tensor:
        final, integral = solve(self.problem, self.problem.reaction(theta), storage=storage)
        return final if self.kind == "final" else integral

    def loss(self, theta: torch.Tensor, storage: Storage) -> torch.Tensor:
        """The objective for theta (..., 7): (...,) values (one per batch entry)."""
        return objective(self.field(theta, storage), self.target, self.problem)
