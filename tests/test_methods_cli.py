"""`longreach methods` lists every registered method with its parameters, defaults and paper."""

from typer.testing import CliRunner

from longreach.cli import app
from longreach.methods import all_methods

runner = CliRunner()


def test_methods_command_lists_each_method_with_parameters_and_paper():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    rows = result.output.splitlines()
    for cls in all_methods():
        row = next((r for r in rows if r.startswith(f"│ {cls.name} ")), None)
        assert row is not None, f"no row for {cls.name}"
        assert cls.paper in row, f"{cls.name}: paper missing from {row!r}"
        if cls.parameters():
            name, default, _ = cls.parameters()[0]
            shown = "auto" if default is None else str(default)
            assert f"{name}={shown}" in row, f"{cls.name}: {name}={shown} missing from {row!r}"
    yarn_rows = "\n".join(rows[rows.index(next(r for r in rows if r.startswith("│ yarn "))) :])
    for expected in ("factor=4.0", "original_max=auto", "alpha=1.0", "beta=32.0", "ramp=index"):
        assert expected in yarn_rows, f"{expected} missing from the yarn row"


def test_help_lists_the_methods_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "methods" in result.output
