"""Learning rules that replace backprop as a whole: FA, DFA and MEM-DFA.

FA(model) and DFA(model, blocks=None) install themselves on the model, which then trains with an
ordinary loop (loss.backward(), optimizer.step()); .remove() undoes them.
MemDFA(model, loss_fn, blocks=None).backward(x, y) runs both passes and returns the loss.
Each is also registered as a training-loop rule ("fa", "dfa", "memdfa") in LEARNING_RULES
(:mod:`randprop.rules.registry`).
"""

from randprop.rules._core import BlockOutput, sequential_blocks
from randprop.rules.dfa import DFA
from randprop.rules.fa import FA
from randprop.rules.memdfa import MemDFA
from randprop.rules.registry import LEARNING_RULES, LearningRule, LossFn, register_rule

__all__ = [
    "DFA",
    "FA",
    "LEARNING_RULES",
    "BlockOutput",
    "LearningRule",
    "LossFn",
    "MemDFA",
    "register_rule",
    "sequential_blocks",
]
