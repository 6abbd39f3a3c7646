"""Security and limits not covered elsewhere: local servers bind loopback, bombs are refused before decoding,
tampered model and dataset files are one line, never a traceback.

Already covered elsewhere (see RELIABILITY.md): weights-only loading and a malicious pickle (tests/test_model.py,
tests/test_tracking.py), path-traversal ids and URL credential redaction in params and errors
(tests/test_security.py; training logs exactly ``TrainConfig.flat_params()``), bad files and masks
(tests/test_readers.py, tests/test_ingest.py), bad CLI values (tests/test_cli.py).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import app
from unetcore.cluster import dask_cluster
from unetcore.config import IngestConfig, ModelConfig
from unetcore.errors import InputError
from unetcore.ingest import ingest_folder
from unetcore.model import build_model, load_model, save_model
from unetcore.store import manifest as mf

runner = CliRunner()
LOOPBACK = "127.0.0.1"


def _one_line(result, code: int = 2) -> str:  # noqa: ANN001 - click's Result
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == code and "Traceback" not in result.output, result.output
    assert len(lines) == 1 or code == 3, result.output
    return result.output


# --- servers bind loopback ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_local_dask_cluster_scheduler_workers_and_dashboard_bind_loopback() -> None:
    with dask_cluster(None, n_workers=1) as cluster:
        client = cluster.client
        info = client.scheduler_info()
        assert urlparse(info["address"]).hostname == LOOPBACK
        assert info["workers"] and all(urlparse(w).hostname == LOOPBACK for w in info["workers"])
        assert urlparse(client.dashboard_link).hostname == LOOPBACK


# --- decompression bombs through the ingest path --------------------------------------------------------------


def _png_claiming(path: Path, height: int, width: int) -> None:
    """A valid 16x16 PNG whose header (with a correct CRC) claims ``height`` x ``width``."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    start = 8 + 8  # signature, then the IHDR chunk's length and type
    data[start:start + 8] = struct.pack(">II", width, height)
    data[start + 13:start + 17] = struct.pack(">I", zlib.crc32(bytes(data[start - 4:start + 13])))
    path.write_bytes(bytes(data))


def _npy_claiming(path: Path, height: int, width: int) -> None:
    """An .npy whose header claims a huge uint8 image while the file holds 64 bytes."""
    np.save(path, np.zeros(64, np.uint8))
    raw = path.read_bytes()
    header_len = struct.unpack("<H", raw[8:10])[0]
    header = raw[10:10 + header_len].decode().replace("(64,)", f"({height}, {width})")
    header = header.ljust(header_len - 1) + "\n"
    path.write_bytes(raw[:10] + header.encode() + raw[10 + header_len:])


@pytest.mark.parametrize(("make", "name", "reason"), [
    (_png_claiming, "bomb.png", r"bomb\.png: image has 300000x300000 = 90,000,000,000 pixels, more than max_pixels"),
    (_npy_claiming, "bomb.npy", r"bomb\.npy: image has 300000x300000 = 90,000,000,000 pixels, more than max_pixels"),
])
def test_a_bomb_is_refused_from_its_header_and_the_rest_ingests(tmp_path: Path, make, name: str,
                                                                reason: str) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "good.npy", np.zeros((40, 50), np.uint8))
    make(images / name, 300_000, 300_000)  # 9e10 pixels: above the default 5e10
    report = ingest_folder(IngestConfig(images=str(images), output=str(tmp_path / "ds"), chunk_size=64))
    [failure] = report.failed
    assert report.added == ["good"] and "\n" not in failure["error"]
    assert re.search(reason, failure["error"]), failure["error"]
    assert list(mf.load(tmp_path / "ds")["images"]) == ["good"]


def test_max_pixels_option_refuses_an_ordinary_image_through_the_cli(tmp_path: Path) -> None:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "big.npy", np.zeros((100, 100), np.uint8))
    result = runner.invoke(app, ["ingest", str(images), "-o", str(tmp_path / "ds"), "--max-pixels", "9999",
                                 "--no-prefect"])
    assert result.exit_code == 3, result.output
    assert "big.npy: image has 100x100 = 10,000 pixels, more than max_pixels" in result.output
    assert "Traceback" not in result.output


# --- tampered model folders -----------------------------------------------------------------------------------

TINY = ModelConfig(base_channels=4, depth=2)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["model"].update(norm="layer"), r"model\.norm: Input should be 'batch', 'instance' or 'group'"),
    (lambda c: c["model"].update(upsample="pixelshuffle"), r"model\.upsample"),
    (lambda c: c["model"].update(base_channels=-8), r"model\.base_channels"),
    (lambda c: c["model"].update(extra_layer=1), r"model\.extra_layer"),
    (lambda c: c.pop("model"), r"no valid 'model' section"),
    (lambda c: c.__setitem__("model", [1, 2]), r"no valid 'model' section"),
], ids=["unknown-norm", "unknown-upsample", "negative-width", "unknown-field", "no-model", "model-not-a-dict"])
def test_tampered_model_config_is_one_line_naming_the_file(tmp_path: Path, edit, message: str) -> None:
    folder = save_model(tmp_path / "m", build_model(TINY))
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError) as info:
        load_model(folder)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(folder / "config.json"))
    assert re.search(message, text), text


def test_weights_of_another_shape_under_an_honest_config_are_refused(tmp_path: Path) -> None:
    folder = save_model(tmp_path / "m", build_model(TINY))
    other = save_model(tmp_path / "o", build_model(TINY.model_copy(update={"num_classes": 3})))
    (folder / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    with pytest.raises(InputError, match="weights do not match the architecture"):
        load_model(folder)


# --- tampered dataset files -----------------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    images = tmp_path / "img"
    images.mkdir()
    np.save(images / "a.npy", np.zeros((40, 50), np.uint8))
    ingest_folder(IngestConfig(images=str(images), output=str(tmp_path / "ds"), chunk_size=64))
    return tmp_path / "ds"


@pytest.mark.parametrize(("content", "needle"), [
    ("{not json", "unreadable manifest"),
    ("[1, 2, 3]", "not a dataset manifest"),
    ('{"version": 1}', "not a dataset manifest"),
], ids=["corrupt-json", "a-list", "no-images"])
@pytest.mark.parametrize("command", ["train", "predict"])
def test_tampered_manifest_is_one_line_naming_it(dataset: Path, tmp_path: Path, content: str, needle: str,
                                                 command: str) -> None:
    (dataset / mf.MANIFEST).write_text(content)
    args = [command, str(dataset), "--no-prefect"] + (["-o", str(tmp_path / "out")] if command == "predict" else [])
    output = _one_line(runner.invoke(app, args))
    assert str(dataset / mf.MANIFEST) in output and needle in output


def test_tampered_manifest_makes_ingest_one_line_too(dataset: Path, tmp_path: Path) -> None:
    (dataset / mf.MANIFEST).write_text("{not json")
    output = _one_line(runner.invoke(app, ["ingest", str(tmp_path / "img"), "-o", str(dataset), "--no-prefect"]))
    assert "unreadable manifest" in output and "--force" in output


@pytest.mark.slow
def test_tampered_normalization_in_a_model_folder_is_one_line_through_predict(dataset: Path, tmp_path: Path) -> None:
    folder = save_model(tmp_path / "m", build_model(TINY), {"normalization": {"mode": "bogus"}, "tile": 64})
    result = runner.invoke(app, ["predict", str(dataset), "-o", str(tmp_path / "out"), "--model", str(folder),
                                 "--tile", "64", "--workers", "1", "--no-prefect"])
    output = _one_line(result)
    assert str(folder / "config.json") in output and "normalization" in output
