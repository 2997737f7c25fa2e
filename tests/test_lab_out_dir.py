"""`longreach train --out`: never overwrite a trained model it did not make; one-line errors."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import longreach
from longreach.cli import app
from longreach.errors import LongreachError
from longreach.lab.train import STATE_FILE, TrainConfig, check_out_dir

CHECKPOINT = Path(longreach.__file__).parent / "lab" / "checkpoint"


def _md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_train_over_a_trained_model_is_refused_before_any_work(tmp_path):
    copy = tmp_path / "ckcopy"
    shutil.copytree(CHECKPOINT, copy)
    before = _md5s(copy)
    result = CliRunner().invoke(app, ["train", "--out", str(copy), "--steps", "3"])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"error: {copy} already holds a trained model and no checkpoint of this run" in text
    assert "--force to replace it" in text
    assert _md5s(copy) == before, "every file of the trained model must be unchanged"
    assert not (copy / "work").exists(), "nothing may be prepared in a refused folder"


def test_the_check_allows_resume_force_and_new_folders(tmp_path):
    copy = tmp_path / "ckcopy"
    shutil.copytree(CHECKPOINT, copy)
    check_out_dir(TrainConfig(out_dir=copy, force=True))  # replacing it on purpose
    check_out_dir(TrainConfig(out_dir=tmp_path / "new"))
    (copy / "work").mkdir()
    with pytest.raises(LongreachError, match="already holds a trained model"):
        check_out_dir(TrainConfig(out_dir=copy))  # a work/ folder without a checkpoint
    (copy / "work" / STATE_FILE).write_bytes(b"")
    check_out_dir(TrainConfig(out_dir=copy))  # this run's checkpoint: resume


def test_train_out_pointing_at_a_file_is_one_line(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("hi\n")
    for out, message in (
        (afile, f"--out {afile} is a file; pass a folder for the trained model."),
        (afile / "sub", f"--out {afile / 'sub'} lies under the file {afile}"),
    ):
        result = CliRunner().invoke(app, ["train", "--out", str(out), "--steps", "3"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert f"error: {message}" in " ".join(result.output.split())
    assert afile.read_text() == "hi\n"
