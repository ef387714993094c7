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


#: "cpu" always; "cuda" where a GPU is present (skipped otherwise): see DEVELOPERS.md
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """The device a device-parametrised test runs on."""
    return torch.device(request.param)
