import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Inputs in tests come from the global RNG; randprop itself never touches it."""
    torch.manual_seed(1234)
