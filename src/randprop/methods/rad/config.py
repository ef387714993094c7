"""The RAD method's config (see :mod:`randprop.methods.rad`)."""

from __future__ import annotations

import dataclasses

from randprop.config import MethodConfig, check_choice, check_fraction, register


@register
@dataclasses.dataclass(frozen=True)
class RAD(MethodConfig):
    """Randomized activation storage for weight gradients.

    keep: fraction p of activation values stored, in (0, 1].
    mode: "sample" (random entries, scaled 1/p) or "project" (Rademacher projection).
    same_sample: share one random pattern across the batch.
    """

    name = "rad"
    keep: float = 0.1
    mode: str = "sample"
    same_sample: bool = False

    def __post_init__(self) -> None:
        check_fraction("rad", "keep", self.keep)
        check_choice("rad", "mode", self.mode, ("sample", "project"))
        check_choice("rad", "same_sample", self.same_sample, (True, False))
