import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _threads(request):
    """One torch thread for the tiny-model tests, up to two for tests of the real model.

    On tiny inputs a second thread only adds wake-up latency, and on a loaded 2-core
    machine it spin-waits for the other core (measured 20 ms vs 0.3 ms per call).
    """
    import torch

    before = torch.get_num_threads()
    real = request.node.get_closest_marker("real") is not None
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)) if real else 1)
    yield
    torch.set_num_threads(before)
