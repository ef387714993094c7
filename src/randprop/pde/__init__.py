"""Scientific-computing problems whose reverse mode runs through many time steps."""

from randprop.pde.reaction_diffusion import (
    ControlProblem,
    ReactionDiffusion,
    Storage,
    objective,
    solve,
)

__all__ = ["ControlProblem", "ReactionDiffusion", "Storage", "objective", "solve"]
