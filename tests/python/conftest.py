"""pytest setup for the qwix-torch Python tests: small thread count, deterministic seeds."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference`, `import _helpers`

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
