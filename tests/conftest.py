import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # Two cores on the CI machine: keep torch from oversubscribing them.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
