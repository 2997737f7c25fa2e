"""Start-up: `import longreach` and `--version`/`--help` do not import torch, and Ctrl-C at
any moment of a command's start ends with "interrupted", never a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import longreach


def test_import_and_version_do_not_import_torch():
    code = (
        "import sys, longreach\n"
        "from longreach.cli import app\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
        "sorted(m for m in sys.modules if m.startswith(('torch', 'transformers')))[:5]\n"
        "print(longreach.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == longreach.__version__


def test_public_functions_load_on_first_use_and_stay_functions():
    code = (
        "import longreach as lr\n"
        "import longreach.extend, longreach.prefill, longreach.session\n"
        "from longreach.prefill import prefill\n"
        "assert lr.prefill is prefill and callable(lr.extend) and callable(lr.load)\n"
        "assert lr.extend.__module__ == 'longreach.extend'\n"
        "print(sorted(n for n in lr.__all__ if callable(getattr(lr, n))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "['Context', 'LongreachError', 'Session', 'extend', 'greedy', 'load', 'prefill', 'read']"
    )


@pytest.mark.parametrize("after", [0.3, 0.8, 1.5])
def test_ctrl_c_during_start_up_is_a_clean_exit(tmp_path, after):
    command = [sys.executable, "-m", "longreach", "bench", "--model", "lab", "--threads", "1"]
    command += ["--lengths", "256,512,1k,2k", "--db", str(tmp_path / "r.db")]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "Traceback" not in out, err[-2000:]
    if proc.returncode == -signal.SIGINT:
        # Ended by the signal itself (inside torch's start-up, which handles SIGINT its own
        # way): silently, as any program, and never with a traceback.
        return
    # 130, with "interrupted" from longreach, or a blank line from typer's own parser.
    assert proc.returncode == 130, (proc.returncode, err[-500:])


def test_a_swallowed_ctrl_c_is_delivered_again():
    # torch's C++ start-up swallows a KeyboardInterrupt raised while it imports numpy.
    code = (
        "import os, signal, time\n"
        "from longreach.__main__ import _on_sigint\n"
        "signal.signal(signal.SIGINT, _on_sigint)\n"
        "try:\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "except KeyboardInterrupt:\n"
        "    pass  # swallowed, as inside torch\n"
        "try:\n"
        "    time.sleep(5); print('ran on')\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted again')\n"
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "interrupted again", out
    assert time.perf_counter() - started < 4
