"""The RAD method's config (see :mod:`randprop.methods.rad`)."""

from __future__ import annotations

import dataclasses

from randprop.config import MethodConfig, check_choice, check_fraction, quiet_field, register
from randprop.methods.kbit import check_storage


@register
@dataclasses.dataclass(frozen=True)
class RAD(MethodConfig):
    """Randomized activation storage for weight gradients.

    keep: fraction p of activation values stored, in (0, 1].
    mode: "sample" (random entries, scaled 1/p) or "project" (Rademacher projection).
    same_sample: share one random pattern across the batch.
    bits: the stored values in 1, 2, 4 or 8 bits with stochastic rounding (still unbiased), or
        32 (full precision); group: values per scale and minimum (0: per row). See
        :mod:`randprop.methods.kbit`.
    """

    name = "rad"
    keep: float = 0.1
    mode: str = "sample"
    same_sample: bool = False
    bits: int = quiet_field(32)
    group: int = quiet_field(0)

    def __post_init__(self) -> None:
        check_fraction("rad", "keep", self.keep)
        check_choice("rad", "mode", self.mode, ("sample", "project"))
        check_choice("rad", "same_sample", self.same_sample, (True, False))
        check_storage("rad", self.bits, self.group)
