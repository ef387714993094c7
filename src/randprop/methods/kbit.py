"""k-bit storage of the values an estimator keeps for backward: the ``bits`` and ``group`` fields
of RAD, Trace, CRS and SparseVJP (row sketches).

At bits = 32 the stored values v (a sketch: sampled, projected or probed values of the input) are
saved as they are. At bits k in {1, 2, 4, 8} they are saved as the k-bit codes of
:func:`randprop.quantize.quantize`, one scale and minimum per ``group`` consecutive values (0: per
row, the last dimension of v), with stochastic rounding: E[Q(v) | v] = v. The rounding is drawn
from ``subseed(seed, SUBSEED_QUANT)``, independent of the method's own draws from ``seed``, so a
weight gradient g that is linear in the stored values stays unbiased:

    E[g(Q(v))] = E_v[g(E[Q(v) | v])] = E_v[g(v)] = the exact gradient.

Backward dequantizes the values before using them (a transient of their full-precision size).
"""

from __future__ import annotations

import torch

from randprop import random as rnd
from randprop.quantize import BITS, QuantizedTensor, quantize_seeded

#: bits of full-precision storage (the values saved as they are)
FULL = 32
#: the allowed values of a config's ``bits``
ALLOWED_BITS = (*BITS, FULL)

Meta = tuple | None


def check_storage(owner: str, bits: object, group: object) -> None:
    """Raise ValueError naming the field and the allowed values unless ``bits`` is one of
    :data:`ALLOWED_BITS` and ``group`` a non-negative int (positive only below 32 bits)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        allowed = ", ".join(map(str, ALLOWED_BITS))
        raise ValueError(
            f"{owner}: bits must be one of {allowed} (32: full precision); got {bits!r}"
        )
    if isinstance(group, bool) or not isinstance(group, int) or group < 0:
        raise ValueError(
            f"{owner}: group must be a non-negative integer (0: one scale per row); got {group!r}"
        )
    if group and bits == FULL:
        raise ValueError(f"{owner}: group applies only with bits in 1, 2, 4, 8; got bits=32")


def pack(
    values: torch.Tensor | None, bits: int, group: int, seed: int | torch.Tensor
) -> tuple[tuple[torch.Tensor | None, ...], Meta]:
    """(tensors for ``ctx.save_for_backward``, meta for a ctx attribute) storing ``values`` in
    ``bits`` bits; the rounding is drawn from ``subseed(seed, SUBSEED_QUANT)`` (``seed`` a
    compiled layer's tensor seed too). At 32 bits (or for None) the tensors are ``(values,)``
    and the meta None."""
    if values is None or bits == FULL:
        return (values,), None
    (q,) = quantize_seeded([values], bits, group or None, seed=seed, tag=rnd.SUBSEED_QUANT)
    return q.tensors, q.meta


def unpack(tensors: tuple[torch.Tensor | None, ...] | list, meta: Meta) -> torch.Tensor | None:
    """The stored values (dequantized) from :func:`pack`'s tensors, as saved, and meta."""
    if meta is None:
        return tensors[0]
    return QuantizedTensor.rebuild(tuple(tensors), meta).dequantize()
