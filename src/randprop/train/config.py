"""TrainConfig: everything one training run depends on (validated at construction)."""

from __future__ import annotations

import dataclasses

from randprop.config import check_choice

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "linear", "onecycle")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    method: a per-layer method ("exact", "rad:keep=0.1,mode=project", ..., or a dict of module
        name patterns to methods as ``convert`` takes), a learning rule in
        ``LEARNING_RULES`` ("fa", "dfa", "memdfa"), or "checkpoint[:segments=K]" (activation
        checkpointing, exact gradients).
    checkpointing: also checkpoint the model's blocks, with a per-layer method (what a plan of
        ``rp.plan`` with ``checkpointing`` asks; ``randprop train --budget`` sets it).
    match_memory_of: a method; the run then trains exact backprop with the largest batch
        (<= ``batch``) whose measured saved bytes do not exceed that method's at ``batch``.
    schedule: learning-rate factor over the run: constant; cosine 0.5 (1 + cos(pi t / T));
        linear 1 - t / T; onecycle torch's OneCycleLR (warm-up to lr, then cosine decay).
    eval_every / log_every / checkpoint_every: in steps; 0 means only at the end.
    out: run directory (metrics.jsonl, summary.json, checkpoint.pt); None writes nothing.
    threads: torch intra-op threads during the run (0 leaves torch's setting). Small models on a
        busy machine run far faster with 1: spinning OpenMP threads fight over the cores.
    resume: continue from out/checkpoint.pt (model, optimizer, schedule, RNG, method state).
    """

    model: str = "mlp"
    data: str = "mnist"
    method: str | dict[str, str] = "exact"
    checkpointing: bool = False
    batch: int = 150
    steps: int = 1000
    seed: int = 0
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    schedule: str = "constant"
    eval_every: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    out: str | None = None
    resume: bool = False
    match_memory_of: str | None = None
    device: str = "cpu"
    data_root: str | None = None
    val_fraction: float = 0.1
    eval_batch: int = 1000
    progress: bool | None = None
    threads: int = 0

    def __post_init__(self) -> None:
        check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        check_choice("train", "schedule", self.schedule, SCHEDULES)
        for field in ("batch", "steps", "eval_batch"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"train: {field} must be a positive int; got {value!r}")
        for field in ("eval_every", "log_every", "checkpoint_every", "threads"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"train: {field} must be an int >= 0; got {value!r}")
        for field in ("lr", "weight_decay", "momentum"):
            if getattr(self, field) < 0:
                raise ValueError(f"train: {field} must be >= 0; got {getattr(self, field)!r}")
        if not isinstance(self.checkpointing, bool):
            raise TypeError(
                f"train: checkpointing must be True or False; got {self.checkpointing!r}"
            )
        if self.checkpointing and self.match_memory_of:
            raise ValueError("train: checkpointing goes with method, not with match_memory_of")
        if self.resume and self.out is None:
            raise ValueError("train: resume needs out, the directory holding checkpoint.pt")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
