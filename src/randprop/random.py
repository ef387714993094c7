"""The only place randprop draws random numbers.

Every draw comes from a dedicated ``torch.Generator`` seeded from (stream, run seed, layer, step,
rank), so the global RNG is never advanced and a run is bitwise repeatable. Autograd Functions
save the integer seed, not the random tensor, and regenerate the same draw in backward.
"""

from __future__ import annotations

import math

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


#: Streams of :func:`derive_seed`: each kind of draw hashes its own tag, so the seeds of the
#: converted layers, the data order, model initialisation, validation split and the feedback
#: matrices of the learning rules never coincide, whatever their other arguments.
STREAM_LAYER = 0
STREAM_DATA = 1
STREAM_INIT = 2
STREAM_SPLIT = 3
STREAM_FA = 4
STREAM_DFA = 5
STREAMS = (STREAM_LAYER, STREAM_DATA, STREAM_INIT, STREAM_SPLIT, STREAM_FA, STREAM_DFA)


def derive_seed(
    seed: int, layer: int = 0, step: int = 0, rank: int = 0, stream: int = STREAM_LAYER
) -> int:
    """Hash (stream, seed, layer, step, rank) into an independent 63-bit seed (SplitMix64
    chain); ``stream`` is one of :data:`STREAMS`."""
    h = 0
    for part in (stream, seed, layer, step, rank):
        h = _splitmix64(h ^ (int(part) & _MASK64))
    return h >> 1


@torch.library.custom_op("randprop::next_seed", mutates_args=("step",))
def next_seed(step: torch.Tensor, seed: int, layer: int, rank: int) -> torch.Tensor:
    """``derive_seed(seed, layer, step, rank)`` as a 0-dim int64 CPU tensor, advancing the 0-dim
    integer tensor ``step`` by one: the form a compiled graph draws a layer's seed in. An opaque
    custom op, so that torch.compile sees the step as data, not a constant to guard on."""
    value = int(step)
    step.add_(1)
    return torch.tensor(derive_seed(seed, layer, value, rank))


@next_seed.register_fake
def _(step: torch.Tensor, seed: int, layer: int, rank: int) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64)


#: Tags of :func:`subseed`: a second kind of draw made under one seed.
SUBSEED_QUANT = 1


def subseed(seed: int, tag: int) -> int:
    """An independent 63-bit seed for the draws of kind ``tag`` (e.g. :data:`SUBSEED_QUANT`,
    the stochastic rounding of a stored sketch) made under ``seed``, so that they are
    independent of the draws made from ``seed`` itself."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ tag) >> 1


def name_id(name: str) -> int:
    """A stable 63-bit id of the string ``name``: SplitMix64 over its UTF-8 bytes, 8 at a time
    (the same in every process and on every platform, unlike ``hash``)."""
    data = name.encode("utf-8")
    h = _splitmix64(len(data))
    for i in range(0, len(data), 8):
        h = _splitmix64(h ^ int.from_bytes(data[i : i + 8], "little"))
    return h >> 1


def current_rank() -> int:
    """The torch.distributed rank, or 0 when not running distributed."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def generator(seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (an int, or the 0-dim tensor a
    compiled layer draws, see :func:`next_seed`)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(int(seed))
    return gen


def bernoulli_mask(
    shape: tuple[int, ...], p: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Boolean mask with independent entries, True with probability ``p``."""
    return torch.rand(shape, generator=gen, device=device) < p


def sample_indices(
    n: int,
    k: int,
    gen: torch.Generator,
    device: torch.device,
    batch_shape: tuple[int, ...] = (),
    replacement: bool = False,
) -> torch.Tensor:
    """``k`` indices in [0, n) for each entry of ``batch_shape``: shape (*batch_shape, k).

    Without replacement every index is included with probability k / n; with replacement each
    of the k draws is uniform.
    """
    if not 0 < k <= n and not replacement:
        raise ValueError(f"k must be in [1, n={n}] without replacement, got {k}")
    if replacement:
        return torch.randint(0, n, (*batch_shape, k), generator=gen, device=device)
    keys = torch.rand((*batch_shape, n), generator=gen, device=device)
    return keys.topk(k, dim=-1, sorted=False).indices


def rademacher(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Independent +-1 entries with equal probability."""
    bits = torch.randint(0, 2, shape, generator=gen, device=device, dtype=torch.int8)
    return (bits * 2 - 1).to(dtype)


def gaussian(
    shape: tuple[int, ...], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Independent standard normal entries."""
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def projection(
    n: int,
    k: int,
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    kind: str = "rademacher",
) -> torch.Tensor:
    """An n x k random matrix R with E[R R^T] = I (entries of variance 1/k)."""
    if kind == "rademacher":
        r = rademacher((n, k), gen, device, dtype)
    elif kind == "gaussian":
        r = gaussian((n, k), gen, device, dtype)
    else:
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    return r / math.sqrt(k)


def kept_count(n: int, fraction: float) -> int:
    """ceil(fraction * n), at least 1 and at most n."""
    return min(n, max(1, math.ceil(fraction * n - 1e-9)))


def orthogonal(
    shape: tuple[int, int], gen: torch.Generator, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``shape`` = (r, n): r rows of norm sqrt(n), orthogonal within blocks of n rows.

    Each block is a Haar-random orthonormal frame (QR of a Gaussian matrix, signs fixed by
    diag(R)) scaled by sqrt(n), so every row z is uniform on the sphere of radius sqrt(n) and
    E[z z^T] = I, while rows of one block are exactly orthogonal.
    """
    r, n = shape
    m = min(r, n)
    work = torch.float64 if dtype == torch.float64 else torch.float32  # QR needs float32+
    g = torch.randn((-(-r // n), n, m), generator=gen, device=device, dtype=work)
    q, rr = torch.linalg.qr(g)
    diag = torch.diagonal(rr, dim1=-2, dim2=-1)
    q = q * torch.where(diag < 0, -1.0, 1.0).unsqueeze(-2)
    return (q.transpose(-2, -1).reshape(-1, n)[:r] * math.sqrt(n)).to(dtype)


PROBES = ("gaussian", "rademacher", "orthogonal")


def probes(
    kind: str,
    shape: tuple[int, int],
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(r, n) probe matrix whose rows z satisfy E[z z^T] = I: one of :data:`PROBES`."""
    if kind == "gaussian":
        return gaussian(shape, gen, device, dtype)
    if kind == "rademacher":
        return rademacher(shape, gen, device, dtype)
    if kind == "orthogonal":
        return orthogonal(shape, gen, device, dtype)
    raise ValueError(f"probe kind must be one of {', '.join(map(repr, PROBES))}; got {kind!r}")


def weighted_indices(weights: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct indices of the 1-D ``weights`` drawn successively without replacement, each
    draw with probability proportional to the weights not yet drawn (Efraimidis-Spirakis keys
    log(u) / w). Zero weights come only after every positive one, in no particular order."""
    n = weights.numel()
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    u = torch.rand(n, generator=gen, device=weights.device, dtype=torch.float64)
    return (u.log() / weights.double()).topk(k, sorted=False).indices


def systematic_slots(
    probs: torch.Tensor, k: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Systematic sampling in ``k`` fixed slots: (indices (k,), valid (k,) bool), index i in a
    valid slot with probability exactly ``probs[i]`` and in at most one.

    ``probs`` (1-D, each in [0, 1]) sums to some S <= k. Systematic sampling over a random
    order: lay the probabilities end to end on [0, S) and take the points u + j, j < k,
    u ~ U[0, 1); each index owns an interval of length probs[i] <= 1, so it holds at most one
    point, and does so with probability probs[i]. The points below S are the valid slots (the
    others hold some index). The
    shapes never depend on the draw, so nothing is read back to the host. Zero probabilities
    are ordered first, so that a point rounded past the last end lands on a positive one.
    """
    n = probs.numel()
    if not 0 < k or n == 0:
        raise ValueError(f"k must be at least 1 and probs non-empty; got k={k}, n={n}")
    keys = torch.rand(n, generator=gen, device=probs.device)
    order = torch.where(probs > 0, keys, -1.0).argsort()
    ends = probs.double()[order].cumsum(0)
    u = torch.rand((), generator=gen, device=probs.device, dtype=torch.float64)
    points = u + torch.arange(k, device=probs.device, dtype=torch.float64)
    idx = order[torch.searchsorted(ends, points, right=True).clamp_max(n - 1)]
    return idx, points < ends[-1]
