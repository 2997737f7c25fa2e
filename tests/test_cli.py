"""The CLI: --help, --version, models, and one-line errors."""

import subprocess
import sys

from typer.testing import CliRunner

import longreach
from longreach.cli import app

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"longreach {longreach.__version__}"


def test_help_lists_models_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output


def test_models_lists_smollm2_with_trained_length():
    result = runner.invoke(app, ["models"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "smollm2-135m" in ln)
    assert "8192" in line and "135M" in line, line


def test_console_script_runs():
    out = subprocess.run(
        [sys.executable, "-m", "longreach", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"longreach {longreach.__version__}"
