"""The `unet` command: help, and one bad-input case per command (one line, exit 2, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app import cli
from app.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("ingest", "train", "predict", "export", "pipeline", "demo", "serve"):
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
                                 "--channel-axis", "xzy", "--no-prefect"])
    _one_line_error(result, "option --channel-axis")


def test_train_on_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    _one_line_error(runner.invoke(app, ["train", str(tmp_path), "--no-prefect"]), "manifest.json")


def test_train_rejects_out_of_range_option(tmp_path: Path) -> None:
    _one_line_error(runner.invoke(app, ["train", str(tmp_path), "--epochs", "0", "--no-prefect"]), "option --epochs")


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
    proc = subprocess.run([sys.executable, "-m", "app.cli", "ingest", str(tmp_path / "missing"), "-o",
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


def test_help_shows_each_default_and_choices_with_whole_option_names() -> None:
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--epochs" in text and "[default: (10)]" in text
    assert "Choices: dice_ce, ce, dice, focal." in text
    predict_help = runner.invoke(app, ["predict", "--help"]).output
    assert "--threads-per-worker" in predict_help and "[default: (512)]" in " ".join(predict_help.split())


def test_a_bad_nested_value_names_the_flag_not_the_field(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", str(tmp_path), "--in-channels", "0", "--no-prefect"])
    _one_line_error(result, "option --in-channels")
    assert "model.in_channels" not in result.output


def test_a_user_error_inside_a_prefect_flow_is_the_same_one_line(tmp_path: Path) -> None:
    """Prefect mode (the default): an error raised inside the flow run prints the line --no-prefect prints, no
    Prefect traceback; the run itself still fails (exit 2)."""
    import fcntl

    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    (tmp_path / "ds").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img" / "a.png")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    with open(tmp_path / "ds" / ".ingest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another ingestion is writing: the flow's task raises InputError
        proc = subprocess.run([sys.executable, "-m", "app.cli", "ingest", str(tmp_path / "img"), "-o",
                               str(tmp_path / "ds")], capture_output=True, text=True, timeout=240, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if "another ingestion is writing" in line]
    assert errors == [f"error: {tmp_path / 'ds'}: another ingestion is writing to this dataset "
                      "(wait for it to finish, then run again)"], output
    assert "Traceback" not in output and "| ERROR" not in output


def test_an_embedded_prefect_server_that_does_not_start_in_time_is_one_line(tmp_path: Path) -> None:
    """A busy machine: the embedded Prefect server misses its start-up limit. The run says so in one line with the
    fixes (no Prefect traceback), exits 2 and writes nothing."""
    import numpy as np
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img" / "a.png")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), cli.EMBEDDED_STARTUP_ENV: "0"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "app.cli", "ingest", str(tmp_path / "img"), "-o",
                           str(tmp_path / "ds")], capture_output=True, text=True, timeout=240, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: embedded Prefect server: did not answer within 0 s, so nothing was run (the "
                      f"machine may be busy: set {cli.EMBEDDED_STARTUP_ENV} higher, or run `prefect server start` "
                      "and export PREFECT_API_URL=http://127.0.0.1:4200/api, or use --no-prefect)"], output
    assert "Traceback" not in output
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_the_embedded_server_gets_longer_than_prefects_default_unless_the_user_set_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.EMBEDDED_STARTUP_ENV, raising=False)
    cli.allow_embedded_server_startup()
    assert os.environ[cli.EMBEDDED_STARTUP_ENV] == str(cli.EMBEDDED_STARTUP_S)
    monkeypatch.setenv(cli.EMBEDDED_STARTUP_ENV, "7")
    cli.allow_embedded_server_startup()
    assert os.environ[cli.EMBEDDED_STARTUP_ENV] == "7"


def test_an_unwritable_output_is_one_line_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "img" / "a.png")
    (tmp_path / "file").write_text("not a folder")
    result = runner.invoke(app, ["ingest", str(tmp_path / "img"), "-o", str(tmp_path / "file" / "ds"),
                                 "--no-prefect"])
    _one_line_error(result, str(tmp_path / "file" / "ds"), "cannot write here")


def test_piped_progress_is_a_line_per_epoch_with_eta(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from app.cli import ProgressLines

    clock = iter([0.0, 40.0, 80.0, 81.0, 82.0])
    monkeypatch.setattr("app.cli.time.monotonic", lambda: next(clock))
    lines = ProgressLines(every_s=10.0)
    lines("train", 0, 3)
    lines("train", 1, 3, "train loss 0.5000, val Dice 0.7000, 40 s/epoch")
    lines("train", 2, 3, "train loss 0.4000, val Dice 0.8000, 40 s/epoch")
    lines("predict a", 0, 100)
    lines("predict a", 1, 100)  # 1 s after the stage began: not due
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "train: 1/3 (33 %), 00:00:40 elapsed, ETA 00:01:20 (train loss 0.5000, val Dice 0.7000, 40 s/epoch)",
        "train: 2/3 (66 %), 00:01:20 elapsed, ETA 00:00:40 (train loss 0.4000, val Dice 0.8000, 40 s/epoch)",
    ]


def test_a_file_system_error_is_one_line_naming_the_path(tmp_path: Path, capsys) -> None:
    """Disk full (ENOSPC) or a read-only file system under a command: one line naming the path (the error's own,
    else the command's output), exit 2, no traceback."""
    import errno

    import typer

    from app.cli import run_command

    def disk_full() -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / "last.pt"))

    def read_only() -> int:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    for action in (disk_full, read_only):
        with pytest.raises(typer.Exit) as exit_:
            run_command(action, tmp_path / "out")
        assert exit_.value.exit_code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)
    assert lines[0].startswith(f"error: {tmp_path / 'run' / 'last.pt'}: no space left on the device")
    assert lines[1].startswith(f"error: {tmp_path / 'out'}: read-only file system")


def test_predict_unknown_model_uri(tmp_path: Path) -> None:
    """An unknown model in Prefect mode (the default): one line, before any server starts."""
    import time

    import numpy as np
    from PIL import Image

    from unetcore.config import IngestConfig
    from unetcore.ingest import ingest_folder

    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "img" / "a.png")
    ingest_folder(IngestConfig(images=str(tmp_path / "img"), output=str(tmp_path / "ds"), chunk_size=64))
    start = time.monotonic()
    result = runner.invoke(app, ["predict", str(tmp_path / "ds"), "-o", str(tmp_path / "out"),
                                 "--model", "models:/unett@champion", "--tracking-uri",
                                 f"sqlite:///{tmp_path / 'mlflow.db'}"])
    _one_line_error(result, "models:/unett@champion", "does not resolve")
    assert time.monotonic() - start < 10 and not (tmp_path / "out").exists()
