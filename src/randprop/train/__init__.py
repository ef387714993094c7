"""The training loop: ``train(TrainConfig(...)) -> summary dict`` for every method and rule."""

from randprop.checkpointing import install_checkpointing
from randprop.train.baselines import install, matched_batch
from randprop.train.config import TrainConfig
from randprop.train.learning_rules import LEARNING_RULES, Backprop, register_rule
from randprop.train.loop import evaluate, train

__all__ = [
    "LEARNING_RULES",
    "Backprop",
    "TrainConfig",
    "evaluate",
    "install",
    "install_checkpointing",
    "matched_batch",
    "register_rule",
    "train",
]
