"""Secrets never reach params or messages; ids from file names cannot escape the dataset folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from unetcore.config import TrainConfig
from unetcore.errors import ServiceError
from unetcore.redact import redact
from unetcore.store import manifest as mf


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://bob:s3cret@mlflow:5000", "http://***@mlflow:5000"),
        ("postgresql://u:pw@db/x and https://t0ken@h/p", "postgresql://***@db/x and https://***@h/p"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("tcp://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
    ],
)
def test_redact_hides_url_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_mlflow_params_and_errors_carry_no_password() -> None:
    params = TrainConfig(dataset="d", tracking_uri="https://alice:hunter2@mlflow.example").flat_params()
    assert "hunter2" not in str(params)
    assert "hunter2" not in str(ServiceError("https://alice:hunter2@mlflow.example", "unreachable"))


@pytest.mark.parametrize("name", ["../../evil.png", "..", "a/../../b.tif", "/etc/passwd", "..\\..\\x.png"])
def test_store_paths_stay_inside_the_dataset(tmp_path: Path, name: str) -> None:
    target = mf.store_path(tmp_path, mf.image_id(Path(name))).resolve()
    assert target.parent == tmp_path.resolve()
