"""Deployments without a server: prefect.yaml and `unet serve` declare the same five deployments, the nightly
schedule, forms built from the typed configs (descriptions, choices, bounds), parameters refused with the field
named, and the nightly flow's report artifacts built from a hand-made night.
"""

from __future__ import annotations

import typing
from pathlib import Path

import pydantic
import pytest
import yaml
from prefect.exceptions import ParameterTypeError
from prefect.flows import load_flow_from_entrypoint
from typer.testing import CliRunner

from app.cli import app
from deployments.serve import (
    NIGHTLY_CRON,
    NIGHTLY_TIMEZONE,
    build_deployments,
    nightly_schedule,
)
from flows import nightly as nightly_flow
from unetcore.config import NightlyConfig
from unetcore.errors import ConfigError
from unetcore.modes import ExportKind

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"ingest", "train", "infer", "pipeline", "nightly"}


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


@pytest.fixture(scope="module")
def served() -> dict:
    return {d.name: d for d in build_deployments()}


def by_name(prefect_yaml: dict) -> dict[str, dict]:
    return {d["name"]: d for d in prefect_yaml["deployments"]}


def test_prefect_yaml_declares_every_flow_on_the_process_pool(prefect_yaml, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # prefect deploy resolves entrypoints from the repository root
    deployments = by_name(prefect_yaml)
    assert set(deployments) == NAMES
    for name, spec in deployments.items():
        assert spec["entrypoint"] == f"flows/{name}.py:{name}"
        assert load_flow_from_entrypoint(spec["entrypoint"]).name == name
        assert spec["work_pool"]["name"] == "unet-pool"


def test_nightly_schedule_is_the_same_in_yaml_and_serve(prefect_yaml, served) -> None:
    [schedule] = by_name(prefect_yaml)["nightly"]["schedules"]
    assert (schedule["cron"], schedule["timezone"], schedule["slug"]) == ("0 2 * * *", "Europe/Berlin", "nightly")
    [served_schedule] = served["nightly"].schedules
    assert served_schedule.schedule.cron == schedule["cron"] == NIGHTLY_CRON
    assert served_schedule.schedule.timezone == schedule["timezone"] == NIGHTLY_TIMEZONE
    assert served_schedule.slug == schedule["slug"]
    assert by_name(prefect_yaml)["nightly"]["concurrency_limit"] == 1 and served["nightly"].concurrency_limit == 1
    assert all(not served[n].schedules for n in NAMES - {"nightly"})


def test_serve_offers_the_yaml_deployments_with_the_same_nightly_parameters(prefect_yaml, served) -> None:
    assert set(served) == NAMES
    for name, spec in by_name(prefect_yaml).items():
        assert served[name].entrypoint == spec["entrypoint"]
        assert served[name].enforce_parameter_schema
    yaml_config = NightlyConfig(**by_name(prefect_yaml)["nightly"]["parameters"]["config"])
    assert NightlyConfig(**served["nightly"].parameters["config"]) == yaml_config


@pytest.mark.parametrize("cron, timezone, field", [("0 2 * *", "UTC", "cron"), ("0 2 * * *", "Mars/Olympus", "timezone")])
def test_bad_schedule_is_refused_with_the_option_named(cron: str, timezone: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"parameter '{field}'"):
        nightly_schedule(cron, timezone)


def _literal_fields(model: type) -> dict[str, tuple]:
    return {name: typing.get_args(f.annotation) for name, f in model.model_fields.items()
            if typing.get_origin(f.annotation) is typing.Literal}


def _models(model: type) -> dict[str, type]:
    """The config model and every model nested in it (the stage options a pipeline or nightly form holds)."""
    found = {model.__name__: model}
    for f in model.model_fields.values():
        if isinstance(f.annotation, type) and issubclass(f.annotation, pydantic.BaseModel):
            found.update(_models(f.annotation))
    return found


@pytest.mark.parametrize("name", sorted(NAMES))
def test_forms_show_choices_bounds_and_descriptions(served, name: str) -> None:
    """The deployment form (its OpenAPI schema): Literal → dropdown, bounds → min/max, help text on every field,
    in the config and in every stage's options nested in it."""
    schema = served[name]._parameter_openapi_schema.model_dump()
    flow = load_flow_from_entrypoint(served[name].entrypoint)
    bounded = []
    for ref, model in _models(typing.get_type_hints(flow.fn)["config"]).items():
        form = schema["definitions"][ref]
        for field, choices in _literal_fields(model).items():
            assert form["properties"][field]["enum"] == list(choices), (ref, field)
        bounded += [f for f, p in form["properties"].items() if {"minimum", "exclusiveMinimum"} & set(p)]
        undescribed = {f for f, p in form["properties"].items() if not p.get("description")}
        assert not undescribed, f"give these fields of {ref} a description: {sorted(undescribed)}"
    assert bounded, "no bounded numeric field"


def test_nightly_form_is_fully_described_and_runnable_without_input(served) -> None:
    schema = served["nightly"]._parameter_openapi_schema.model_dump()
    form = schema["definitions"]["NightlyConfig"]
    assert all(p.get("description") for p in form["properties"].values())
    predict = schema["definitions"]["InferOptions"]["properties"]  # the nightly's `predict` options
    assert predict["export"]["enum"] == list(typing.get_args(ExportKind))  # every export, as a dropdown
    assert (predict["tile"]["minimum"], predict["tile"]["maximum"]) == (16, 4096)
    assert "inbox" in schema["properties"]["config"]["description"]  # from the flow's docstring
    assert not schema.get("required")  # the schedule can start it with the defaults


@pytest.mark.parametrize("entrypoint, config", [
    ("flows/infer.py:infer", {"dataset": "d", "output": "o", "tile": -1}),
    ("flows/nightly.py:nightly", {"predict": {"tile": -1}}),
])
def test_out_of_bounds_parameter_is_refused_naming_the_field(monkeypatch, entrypoint: str, config: dict) -> None:
    monkeypatch.chdir(ROOT)
    flow = load_flow_from_entrypoint(entrypoint)
    with pytest.raises(ParameterTypeError, match=r"config\.(predict\.)?tile: Input should be greater than or equal to 16"):
        flow.validate_parameters({"config": config})


# ---------------------------------------------------------------- `unet serve` pre-flight

runner = CliRunner()


def test_serve_without_a_prefect_server_is_one_line(monkeypatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "PREFECT_API_URL: not set" in result.output and "prefect server start" in result.output


def test_serve_refuses_a_bad_time_zone_before_contacting_anything() -> None:
    result = runner.invoke(app, ["serve", "--timezone", "Mars/Olympus"])
    assert result.exit_code == 2 and "parameter 'timezone'" in result.output


# ---------------------------------------------------------------- the nightly report artifacts

NIGHT = {
    "status": "partial",
    "model": {"name": "unet", "alias": "champion", "version": 3, "run_id": "abc", "source": "s", "uri": "models:/unet/3"},
    "ingest": {"ingested": ["a", "b"], "unchanged": ["c"], "seconds": 1.5,
               "failed": [{"id": "bad", "file": "/in/bad.png", "error": "/in/bad.png: not an image"}]},
    "images": [
        {"id": "a", "status": "predicted", "model_version": 3, "pixels": 600_000, "seconds": 1.0,
         "megapixels_per_s": 0.6, "dice": 0.8, "output": "/p/a.ome.zarr"},
        {"id": "b", "status": "predicted", "model_version": 3, "pixels": 400_000, "seconds": 1.0,
         "megapixels_per_s": 0.4, "dice": 0.6, "output": "/p/b.ome.zarr"},
        {"id": "c", "status": "failed", "model_version": 3, "error": "c: expects 1 channels"},
    ],
    "skipped": ["d"],
    "seconds": 5.0,
}


def test_summary_counts_throughput_dice_and_failures() -> None:
    text = nightly_flow.summary_markdown(NIGHT)
    # new | unchanged | predicted | already done | failed | MP | predict s | MP/s | mean Dice
    assert "| 2 | 1 | 2 | 1 | 2 | 1.00 | 2.0 | 0.50 | 0.7000 |" in text
    assert "**version 3**" in text and "`bad`: /in/bad.png: not an image" in text and "`c`: c: expects" in text


def test_table_lists_predictions_and_both_kinds_of_failure() -> None:
    rows = nightly_flow.image_rows(NIGHT)
    assert [(r["id"], r["status"]) for r in rows] == [
        ("a", "predicted"), ("b", "predicted"), ("c", "failed"), ("bad", "failed (ingest)")]
    assert len({tuple(r) for r in rows}) == 1  # same columns in every row


def test_idle_night_still_gets_a_table_row() -> None:
    idle = {**NIGHT, "images": [], "ingest": {**NIGHT["ingest"], "failed": []}}
    assert [(r["id"], r["status"], r["model_version"]) for r in nightly_flow.image_rows(idle)] == [
        ("-", "nothing new", 3)]


@pytest.mark.parametrize("uri, expected", [
    ("http://127.0.0.1:5000/", "http://127.0.0.1:5000/#/models/unet/versions/3"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db#models/unet/versions/3"),
])
def test_model_link_points_at_the_version(uri: str, expected: str) -> None:
    from unetcore.tracking import PinnedModel

    model = PinnedModel(uri="models:/unet/3", directory=Path("m"), name="unet", alias="champion", version=3,
                        run_id="abc", source="s")
    assert nightly_flow.model_url(uri, model) == expected
