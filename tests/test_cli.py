"""The `unet` command: help, and one bad-input case per command (one line, exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from unetcore.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "train", "predict", "pipeline", "demo", "serve"):
        assert command in result.output


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0]


def test_ingest_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    _one_line_error(runner.invoke(app, ["ingest", str(missing), "-o", str(tmp_path / "ds"), "--no-prefect"]),
                    str(missing))
    assert not (tmp_path / "ds").exists()


def test_ingest_unknown_option_value(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    result = runner.invoke(app, ["ingest", str(tmp_path / "imgs"), "-o", str(tmp_path / "ds"),
                                 "--channel-axis", "zyx", "--no-prefect"])
    _one_line_error(result, "channel_axis")


def test_train_on_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    _one_line_error(runner.invoke(app, ["train", str(tmp_path), "--no-prefect"]), "manifest.json")


def test_train_rejects_out_of_range_option(tmp_path: Path) -> None:
    _one_line_error(runner.invoke(app, ["train", str(tmp_path), "--epochs", "0", "--no-prefect"]), "epochs")


def test_predict_on_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path), "-o", str(tmp_path / "out"), "--no-prefect"])
    _one_line_error(result, "manifest.json")


def test_predict_unknown_split(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(tmp_path), "-o", str(tmp_path / "out"), "--split", "holdout"])
    _one_line_error(result, "split")


def test_pipeline_missing_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "masks").mkdir()
    monkeypatch.chdir(tmp_path)  # the default --workdir (work/) and any tracking store would land here
    result = runner.invoke(app, ["pipeline", str(tmp_path / "none"), "--masks", str(tmp_path / "masks")])
    _one_line_error(result, "none")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["masks"]


def test_real_process_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "unetcore.cli", "ingest", str(tmp_path / "missing"), "-o",
                           str(tmp_path / "ds"), "--no-prefect"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "missing" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("command", ["ingest", "train", "predict", "pipeline", "demo"])
def test_each_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_unreachable_prefect_api_fails_fast_naming_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "imgs").mkdir()
    import numpy as np
    from skimage import io as skio

    skio.imsave(tmp_path / "imgs" / "a.png", np.zeros((8, 8), np.uint8), check_contrast=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    start = time.monotonic()
    result = runner.invoke(app, ["ingest", str(tmp_path / "imgs"), "-o", str(tmp_path / "ds")])
    elapsed = time.monotonic() - start
    _one_line_error(result, "http://127.0.0.1:9/api", "Prefect API unreachable")
    assert elapsed < 10, f"took {elapsed:.1f} s to report an unreachable Prefect API"
    assert not (tmp_path / "ds").exists()
