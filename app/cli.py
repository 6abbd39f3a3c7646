"""The ``unet`` command: ingest, plan, train, predict, export, pipeline, demo (and serve).

Each command builds the typed config (refusing bad values with the option named), runs quick pre-flight checks
(folders exist, tracking server reachable) so a user error never costs hours, then runs the Prefect flow (or the
library directly with ``--no-prefect``). User errors print one line and exit 2; a partial ingestion exits 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.markup import escape

from unetcore.config import (
    DEFAULT_TRACKING_URI,
    ExportConfig,
    InferConfig,
    IngestConfig,
    ModelConfig,
    TrainConfig,
)
from unetcore.errors import ConfigError, UnetError

# Help is 120 columns wide when piped (rich's 80 cut option names such as --threads-per-worker); a terminal's own
# width otherwise. Said through typer's TERMINAL_WIDTH: typer.rich_utils (and rich's markdown, ~0.3 s) is then
# imported only when help or an error is shown, not on every command's start.
if not sys.stdout.isatty():
    os.environ.setdefault("TERMINAL_WIDTH", "120")
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="UNet segmentation for images of any size: ingest → train → predict.")

EXIT_PARTIAL = 3


def _field(schema: type[BaseModel], path: str) -> Any:
    """The pydantic field ``path`` (dotted for nested models, e.g. ``model.depth``) of ``schema``."""
    *parents, leaf = path.split(".")
    for name in parents:
        schema = schema.model_fields[name].default_factory().__class__  # type: ignore[misc, union-attr]
    return schema.model_fields[leaf]


FLAGS: dict[str, str] = {}
"""Config field (as the library names it in a ConfigError) -> the CLI flag that sets it."""


def option(schema: type[BaseModel], path: str, *decls: str, help: str | None = None) -> Any:
    """A ``--flag`` for config field ``path``: its help, choices and default come from the field itself."""
    info = _field(schema, path)
    leaf = path.split(".")[-1]
    flag = decls[0] if decls else "--" + leaf.replace("_", "-")
    FLAGS.setdefault(path, flag)
    FLAGS.setdefault(leaf, flag)
    text = escape(help or info.description or "")  # rich markup would eat "[background, foreground]"
    choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
    if choices:
        text += f" Choices: {', '.join(map(str, choices))}."
    default = info.get_default(call_default_factory=True)
    shown = "none" if default is None else ",".join(map(str, default)) if isinstance(default, list) else str(default)
    return typer.Option(None, flag, *decls[1:], help=text, show_default=shown or "empty")


def flag_error(err: ConfigError) -> str:
    """A config error as the user typed it: ``option --in-channels: ...`` instead of ``parameter 'model.in_channels'``."""
    flag = FLAGS.get(err.field) or FLAGS.get(err.field.split(".")[-1])
    return f"option {flag}: {err.reason}" if flag else str(err)


PROGRESS_EVERY_S = 10.0
"""When stderr is not a terminal, a stage's progress line is printed at most this often (and at its end)."""


def _eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


class ProgressLines:
    """Progress reports as plain lines (stderr piped to a log): ``train: 3/10 epochs (30 %), 00:02:03 elapsed,
    ETA 00:04:47 (train loss 0.31, val Dice 0.81, 41 s/epoch)``; at most one per ``every_s`` per stage, every
    unit that has a detail (an epoch), and the last."""

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s = every_s
        self.started: dict[str, tuple[float, int]] = {}
        self.last: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        t0, done0 = self.started.setdefault(stage, (now, done))
        due = done >= total or bool(detail) or now - self.last.get(stage, t0) >= self.every_s
        if done == done0 or not due:
            return
        self.last[stage] = now
        elapsed = now - t0
        eta = elapsed / (done - done0) * (total - done)
        line = f"{stage}: {done}/{total} ({100 * done // max(total, 1)} %), {_eta(elapsed)} elapsed, ETA {_eta(eta)}"
        typer.echo(line + (f" ({detail})" if detail else ""), err=True)


@contextlib.contextmanager
def _progress_bar() -> Iterator[None]:
    """Show library progress reports: a live bar per stage on a terminal, plain lines when stderr is piped."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from unetcore import progress

    if not sys.stderr.isatty():
        with progress.subscribed(ProgressLines()):
            yield
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[detail]}"), transient=False)
    tasks: dict[str, Any] = {}

    def on_report(stage: str, done: int, total: int, detail: str = "") -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, detail="")
        bars.update(tasks[stage], completed=done, total=total, **({"detail": detail} if detail else {}))

    with bars, progress.subscribed(on_report):
        yield


def run_command(action: Callable[[], int | None], output: Path | None = None) -> None:
    """Run a command body: user errors (and file-system errors, named by their path or else ``output``) become
    one line and exit 2."""
    try:
        code = action() or 0
    except ConfigError as err:
        typer.echo(f"error: {flag_error(err)}", err=True)
        raise typer.Exit(err.exit_code) from None
    except UnetError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except OSError as err:  # disk full, permission denied, read-only: name the path; finished work is on disk
        from unetcore.fs import os_error_reason

        where = err.filename or output or "a file"
        typer.echo(f"error: {where}: {os_error_reason(err)} (free space or fix permissions, then re-run the same "
                   "command: finished images, blocks and epochs are kept)", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:
        # Each stage says what its own interrupt kept (training: TrainingInterrupted); ingestion and prediction
        # keep every finished image or block, and their re-run skips them.
        message = getattr(exc, "message", "") or "interrupted: completed work is kept; re-run the same command to resume"
        typer.echo(message if message.startswith("interrupted") else f"interrupted: {message}", err=True)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


def _config(schema: type, /, **values: Any) -> Any:
    from unetcore.config import validated

    return validated(schema, **{k: v for k, v in values.items() if v is not None})


def check_prefect_api(required: bool = False, timeout_s: float = 3.0) -> str | None:
    """The Prefect API URL after checking that it answers (``/health``), or None when none is configured.

    Without ``PREFECT_API_URL`` a flow starts an ephemeral server in-process, which needs no check; ``required``
    (deployments, which would vanish with a throw-away server) refuses that case.

    Raises:
        ServiceError: the server does not answer, or ``required`` and no URL is set.
    """
    import urllib.error
    import urllib.request

    from unetcore.errors import ServiceError

    url = os.environ.get("PREFECT_API_URL")
    if not url and required:
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
    hint = ("run `prefect server start` and `export PREFECT_API_URL=http://127.0.0.1:4200/api`" if required else
            "start `prefect server start`, unset PREFECT_API_URL, or use --no-prefect")
    if not url:
        if required:
            raise ServiceError("PREFECT_API_URL", "not set: deployments need a running Prefect server", hint)
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as exc:
        raise ServiceError(url, f"Prefect API unreachable ({getattr(exc, 'reason', exc)})", hint) from None
    return url


def _flow_or_library(use_prefect: bool, flow_fn: Callable[[Any], Any], lib_fn: Callable[[Any], Any], cfg: Any,
                     check: Callable[[Any], Any], flow_module: str | None = None) -> Any:
    """Run a stage through its one front door.

    ``--no-prefect``: the library's entry point, which runs the stage's checks once. Prefect: the stage's checks
    run here first, so a user error costs no server start-up, then the flow, whose entry point checks again (a
    run started from the UI or a schedule is checked too). ``flow_module`` is imported only then (Prefect's import
    costs seconds a ``--no-prefect`` run does not pay), before the hold on Prefect's console lines.
    """
    if not use_prefect:
        with _progress_bar():
            return lib_fn(cfg)
    import importlib

    allow_embedded_server_startup()
    importlib.import_module(flow_module or "prefect")  # sets up the console handlers that the hold below holds
    check(cfg)
    check_prefect_api()
    with _progress_bar(), _user_errors_told_once(), embedded_server_errors():
        return flow_fn(cfg)


EMBEDDED_STARTUP_S = 120
"""Seconds the embedded (ephemeral) Prefect server may take to answer. Prefect's own default, 20 s, is too short on a
busy 2-core machine: the run then died in a 70-line traceback before doing anything."""
EMBEDDED_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def allow_embedded_server_startup() -> None:
    """Give the embedded Prefect server :data:`EMBEDDED_STARTUP_S` to start unless the user set the limit; call it
    before Prefect is imported (its settings are read then)."""
    os.environ.setdefault(EMBEDDED_STARTUP_ENV, str(EMBEDDED_STARTUP_S))


@contextlib.contextmanager
def embedded_server_errors() -> Iterator[None]:
    """Prefect's "timed out ... ephemeral Prefect API server" becomes one :class:`ServiceError` line with the fixes.

    It is raised when the flow starts, before any task: nothing was done, so the same command can simply be run
    again.
    """
    from unetcore.errors import ServiceError

    try:
        yield
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        limit = os.environ.get(EMBEDDED_STARTUP_ENV, "?")
        raise ServiceError("embedded Prefect server", f"did not answer within {limit} s, so nothing was run",
                           f"the machine may be busy: set {EMBEDDED_STARTUP_ENV} higher, or run `prefect server "
                           "start` and export PREFECT_API_URL=http://127.0.0.1:4200/api, or use --no-prefect"
                           ) from None


@contextlib.contextmanager
def _user_errors_told_once() -> Iterator[None]:
    """Hold back Prefect's console ERROR lines while a flow runs; drop them if it fails with a user error.

    A user error (or a file-system error) is then the one line :func:`run_command` prints, as with ``--no-prefect``, instead of the task's failure
    lines and a traceback. The flow run still ends Failed, with the reason and traceback in its log on the server
    (only the console handlers are held). Any other failure (or success) gets every held line back.
    """
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    held: list[tuple[logging.Handler, logging.LogRecord]] = []
    loggers = [logging.getLogger(), *(lg for lg in logging.root.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    consoles = {h for lg in loggers for h in lg.handlers if isinstance(h, PrefectConsoleHandler)}

    class Hold(logging.Filter):
        def __init__(self, handler: logging.Handler) -> None:
            super().__init__()
            self.handler = handler

        def filter(self, record: logging.LogRecord) -> bool:
            if record.levelno < logging.ERROR:
                return True
            held.append((self.handler, record))
            return False

    filters = {h: Hold(h) for h in consoles}
    for handler, filt in filters.items():
        handler.addFilter(filt)
    user_error = False
    try:
        yield
    except (UnetError, OSError):  # both are the one line run_command prints
        user_error = True
        raise
    finally:
        for handler, filt in filters.items():
            handler.removeFilter(filt)
        if not user_error:
            for handler, record in held:
                handler.handle(record)


PREFECT_OPT = typer.Option(True, "--prefect/--no-prefect", help="Run as a Prefect flow (default) or call the library directly.")


@app.command()
def ingest(
    images: Path = typer.Argument(..., help="A folder of images, one image, or a glob (TIFF, OME-TIFF, SVS, PNG, JPEG, NPY, Zarr, NIfTI, a DICOM series folder)."),
    output: Path = typer.Option(..., "--output", "-o", help="Dataset folder to write."),
    masks: Optional[Path] = typer.Option(None, help="Folder of masks with the same file stems."),
    chunk_size: Optional[int] = option(IngestConfig, "chunk_size"),
    num_classes: Optional[int] = option(IngestConfig, "num_classes"),
    class_names: Optional[str] = option(IngestConfig, "class_names", help="Comma-separated name per class, "
                                        "background first (e.g. background,nucleus,membrane); implies "
                                        "--num-classes; recorded with models and predictions."),
    val_fraction: Optional[float] = option(IngestConfig, "val_fraction"),
    test_fraction: Optional[float] = option(IngestConfig, "test_fraction"),
    channel_axis: Optional[str] = option(IngestConfig, "channel_axis"),
    max_pixels: Optional[int] = option(IngestConfig, "max_pixels"),
    force: bool = typer.Option(False, help="Re-ingest unchanged images too."),
    pyramid: bool = typer.Option(True, help="Write the multiscale pyramid (levels 1..n) for viewers."),
    mpp: Optional[float] = option(IngestConfig, "mpp"),
    threads: Optional[int] = option(IngestConfig, "threads"),
    n_workers: Optional[int] = option(IngestConfig, "n_workers"),
    scheduler_address: Optional[str] = option(IngestConfig, "scheduler_address"),
    use_prefect: bool = PREFECT_OPT,
) -> None:
    """Ingest a folder of images (and masks) into OME-Zarr stores plus a manifest (incremental)."""

    def body() -> int:
        from unetcore.config import IngestConfig
        from unetcore.ingest import check_ingestable, ingest_folder

        cfg = _config(IngestConfig, images=str(images), masks=str(masks) if masks else None, output=str(output),
                      chunk_size=chunk_size, num_classes=num_classes,
                      class_names=class_names.split(",") if class_names else None, val_fraction=val_fraction,
                      test_fraction=test_fraction, channel_axis=channel_axis, max_pixels=max_pixels, force=force,
                      pyramid=pyramid, mpp=mpp, threads=threads, n_workers=n_workers,
                      scheduler_address=scheduler_address)
        def ingest_flow(c: IngestConfig) -> Any:
            from flows.ingest import ingest  # Prefect is imported only when it runs the stage

            return ingest(c)

        report = _flow_or_library(use_prefect, ingest_flow, lambda c: ingest_folder(c).to_dict(), cfg,
                                  check_ingestable, "flows.ingest")
        for failure in report["failed"]:
            typer.echo(f"skipped: {failure['error']}", err=True)
        for warning in report["warnings"]:
            typer.echo(f"warning: {warning}", err=True)
        typer.echo(f"ingest {report['status']}: {len(report['added'])} added, {len(report['updated'])} updated, "
                   f"{len(report['skipped'])} unchanged, {len(report['failed'])} failed -> {output}/manifest.json")
        return EXIT_PARTIAL if report["status"] in ("partial", "failed") else 0

    run_command(body, output)


@app.command()
def train(
    dataset: Path = typer.Argument(..., help="Dataset folder written by `unet ingest`."),
    output: Optional[Path] = option(TrainConfig, "output"),
    epochs: Optional[int] = option(TrainConfig, "epochs"),
    steps_per_epoch: Optional[int] = option(TrainConfig, "steps_per_epoch"),
    patch_size: Optional[int] = option(TrainConfig, "patch_size"),
    batch_size: Optional[int] = option(TrainConfig, "batch_size"),
    lr: Optional[float] = option(TrainConfig, "lr"),
    optimizer: Optional[str] = option(TrainConfig, "optimizer"),
    schedule: Optional[str] = option(TrainConfig, "schedule"),
    loss: Optional[str] = option(TrainConfig, "loss"),
    num_classes: Optional[int] = option(TrainConfig, "model.num_classes"),
    in_channels: Optional[int] = option(TrainConfig, "model.in_channels"),
    base_channels: Optional[int] = option(TrainConfig, "model.base_channels"),
    depth: Optional[int] = option(TrainConfig, "model.depth"),
    deep_supervision: Optional[bool] = option(TrainConfig, "model.deep_supervision",
                                              "--deep-supervision/--no-deep-supervision"),
    dims: Optional[int] = option(TrainConfig, "model.spatial_dims", "--dims",
                                 help="Spatial dimensions of the model; default: the data's (the plan). 2 on volumes "
                                 "trains nnU-Net's \"2d\" configuration: a 2-D model on z-slices, planned for them, "
                                 "validated in 3-D and predicting volumes slice by slice."),
    time_budget_s: Optional[float] = option(TrainConfig, "time_budget_s"),
    patience: Optional[int] = option(TrainConfig, "patience"),
    device: Optional[str] = option(TrainConfig, "device"),
    tracking_uri: Optional[str] = option(TrainConfig, "tracking_uri"),
    registered_model: Optional[str] = option(TrainConfig, "registered_model"),
    resume: Optional[bool] = typer.Option(
        None, "--resume/--restart", show_default=False,
        help="Default: an unfinished run of the same recipe in --output is resumed (re-running the same command goes "
        "on where it stopped), a finished one started over. --resume: resume or refuse; --restart: start over, "
        "replacing the unfinished checkpoint."),
    seed: Optional[int] = option(TrainConfig, "seed"),
    sampling: Optional[str] = option(TrainConfig, "sampling"),
    class_weights: Optional[str] = option(TrainConfig, "class_weights", help="Comma-separated cross-entropy weight per class (num_classes values; [background, foreground] if binary)."),
    ignore_index: Optional[int] = option(TrainConfig, "ignore_index"),
    num_workers: Optional[int] = option(TrainConfig, "num_workers"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the training forward pass."),
    hd95: bool = typer.Option(False, "--hd95", help="Also report the 95th-percentile Hausdorff distance."),
    use_prefect: bool = PREFECT_OPT,
) -> None:
    """Train a UNet on an ingested dataset; track it in MLflow and register it (champion gate)."""

    def body() -> int:
        from unetcore.config import TrainConfig
        from unetcore.planning import planned_config
        from unetcore.tracking import browse_hint
        from unetcore.training import check_trainable
        from unetcore.training import train as train_lib

        given = {"output": str(output) if output else None, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                 "patch_size": patch_size, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
                 "schedule": schedule, "loss": loss, "model.num_classes": num_classes, "model.in_channels": in_channels,
                 "model.base_channels": base_channels, "model.depth": depth,
                 "model.deep_supervision": deep_supervision, "model.spatial_dims": dims, "time_budget_s": time_budget_s,
                 "patience": patience, "device": device, "tracking_uri": tracking_uri,
                 "registered_model": registered_model, "resume": resume, "seed": seed, "sampling": sampling,
                 "ignore_index": ignore_index, "num_workers": num_workers,
                 "class_weights": class_weights.split(",") if class_weights else None,
                 "compile": compile_model or None, "hd95": hd95 or None}
        explicit = {k: v for k, v in given.items() if v is not None}
        model = _config(ModelConfig, **{k.split(".")[1]: v for k, v in explicit.items() if k.startswith("model.")})
        # a bad value is refused, naming its option, before the dataset is read (the ones checked against the
        # classes, once the plan has them)
        _config(TrainConfig, dataset=str(dataset), model=model,
                **{k: v for k, v in explicit.items()
                   if not k.startswith("model.") and k not in ("class_weights", "ignore_index")})
        cfg, plan = planned_config(dataset, explicit)
        check_trainable(cfg)  # a refusal is the one line, before the plan is shown (the flow checks again)
        typer.echo(f"plan of {dataset} (options override their field; `unet plan` writes it to plan.json):\n"
                   f"{plan.table()}\noverridden by options: {', '.join(plan.overridden) or 'none'}")
        def train_flow(c: TrainConfig) -> Any:
            from flows.train import train  # Prefect is imported only when it runs the stage

            return train(c, plan.to_dict())

        result = _flow_or_library(use_prefect, train_flow,
                                  lambda c: train_lib(c, plan=plan).to_dict(), cfg, lambda c: None, "flows.train")
        typer.echo(f"trained in {result['seconds']:.0f} s: best val Dice {result['best_val_dice']:.4f} "
                   f"(epoch {result['best_epoch']}); model {result['model_name']} v{result['model_version']} "
                   f"-> alias '{result['alias']}'; MLflow run {result['run_id']} in {cfg.tracking_uri}\n"
                   f"  browse: {browse_hint(cfg.tracking_uri, result['experiment_id'], result['run_id'])}\n"
                   f"  checkpoint: {Path(cfg.output) / 'last.pt'}\n  best model: {result['model_dir']}")
        return 0

    run_command(body, output)


@app.command()
def plan(
    dataset: Path = typer.Argument(..., help="Dataset folder written by `unet ingest`."),
    dims: Optional[int] = typer.Option(None, "--dims", help="Plan a model of these spatial dimensions; default: the "
                                       "data's. 2 on volumes: nnU-Net's \"2d\" configuration (a 2-D model on "
                                       "z-slices), as `unet train --dims 2` trains it."),
) -> None:
    """Plan a training from the dataset's fingerprint: print each choice and why; write <dataset>/plan.json."""

    def body() -> int:
        from unetcore.planning import plan_dataset, write_plan

        planned = plan_dataset(dataset, spatial_dims=dims)
        typer.echo(planned.table())
        typer.echo(f"plan written to {write_plan(planned, dataset)}; `unet train {dataset}` trains it (an option "
                   "overrides exactly its field)")
        return 0

    run_command(body)


@app.command()
def predict(
    dataset: Path = typer.Argument(..., help="Dataset folder written by `unet ingest`."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for <id>.ome.zarr predictions."),
    model: Optional[str] = option(InferConfig, "model"),
    tracking_uri: Optional[str] = option(InferConfig, "tracking_uri"),
    split: Optional[str] = option(InferConfig, "split"),
    tile: Optional[int] = option(InferConfig, "tile"),
    overlap: Optional[float] = option(InferConfig, "overlap"),
    batch_size: Optional[int] = option(InferConfig, "batch_size"),
    block_size: Optional[int] = option(InferConfig, "block_size"),
    threshold: Optional[float] = option(InferConfig, "threshold"),
    tta: bool = typer.Option(False, help="Flip test-time augmentation."),
    min_object_size: Optional[int] = option(InferConfig, "min_object_size"),
    skip_empty: bool = typer.Option(True, "--skip-empty/--no-skip-empty",
                                    help="Constant tiles get background without running the model."),
    instances: bool = typer.Option(False, help="Also write instance labels (labels/instances)."),
    skip_background: Optional[bool] = typer.Option(
        None, "--skip-background/--no-skip-background", show_default="on for slides (--mpp or a pyramidal TIFF)",
        help="Tiles outside the tissue mask (Otsu on a <= 2 MP pyramid level, dilated by a tile) get exact "
             "background without running the model."),
    export: Optional[str] = option(InferConfig, "export"),
    scheduler_address: Optional[str] = option(InferConfig, "scheduler_address"),
    workers: Optional[int] = option(InferConfig, "n_workers", "--workers"),
    threads_per_worker: Optional[int] = option(InferConfig, "threads_per_worker"),
    device: Optional[str] = option(InferConfig, "device"),
    precision: Optional[str] = option(InferConfig, "precision"),
    runtime: Optional[str] = option(InferConfig, "runtime"),
    overwrite: bool = typer.Option(False, help="Replace an existing, different prediction."),
    use_prefect: bool = PREFECT_OPT,
) -> None:
    """Predict an ingested dataset with tiled, blended inference on Dask, streamed to OME-Zarr."""

    def body() -> int:
        from unetcore.config import InferConfig
        from unetcore.inference import (
            check_predictable,
            predict_dataset,
            results_to_dicts,
        )

        cfg = _config(InferConfig, dataset=str(dataset), output=str(output), model=model, tracking_uri=tracking_uri,
                      split=split, tile=tile, overlap=overlap, batch_size=batch_size, block_size=block_size,
                      threshold=threshold, tta=tta, min_object_size=min_object_size, skip_empty=skip_empty,
                      skip_background=skip_background, instances=instances, export=export,
                      scheduler_address=scheduler_address, n_workers=workers, threads_per_worker=threads_per_worker,
                      device=device, precision=precision, runtime=runtime, overwrite=overwrite)
        def infer_flow(c: InferConfig) -> Any:
            from flows.infer import infer  # Prefect is imported only when it runs the stage

            return infer(c)

        with _engine_log_to_stderr(not use_prefect):  # flows forward it to the run's log themselves
            results = _flow_or_library(use_prefect, infer_flow, lambda c: results_to_dicts(predict_dataset(c)), cfg,
                                       check_predictable, "flows.infer")
        _print_predictions(results)
        return 0

    run_command(body, output)


@contextlib.contextmanager
def _engine_log_to_stderr(enabled: bool) -> Iterator[None]:
    """Show the inference engine's INFO lines (Dask dashboard link, cluster shape) on stderr while running."""
    import logging

    from unetcore.inference import logs_to

    if not enabled:
        yield
        return
    with logs_to(logging.StreamHandler(sys.stderr)):
        yield


def _print_provenance(results: list[dict[str, Any]]) -> None:
    """The run's provenance, once: model, code and options (each image's input hash is on its own lines)."""
    from unetcore.inference import provenance_lines

    first = next((r["provenance"] for r in results if r.get("provenance")), None)
    if first is not None:
        typer.echo("provenance (kept in each store's attributes and export):")
        for line in provenance_lines(first):
            typer.echo(f"  {line}")


def _print_predictions(results: list[dict[str, Any]]) -> None:
    _print_provenance(results)
    for r in results:
        dice = f", Dice {r['dice']:.4f}" if r["dice"] is not None else ""
        typer.echo(f"  {r['id']}: {r['pixels'] / 1e6:.2f} MP in {r['seconds']:.1f} s ({r['megapixels_per_s']:.2f} "
                   f"MP/s{dice})\n    zarr: {r['output']}\n    mask: {r['export']}\n    preview: {r['preview']}")
        if r.get("objects"):
            typer.echo(f"    objects: {r['objects']}")
        source = ((r.get("provenance") or {}).get("input") or {}).get("source_hash")
        if source:
            typer.echo(f"    input hash: {source}")
        if r.get("blocks"):
            typer.echo(f"    blocks: {r['blocks']} ({r['blocks_skipped']} already done), tiles computed "
                       f"{r.get('tile_evaluations', 0) - r.get('background_tiles', 0)} for {r.get('grid_tiles', 0)} "
                       "in the grid"
                       + (f" ({r['background_tiles']} background tiles skipped)" if r.get("background_tiles") else "")
                       + (f", {r['instances']} instances" if r.get("instances") is not None else ""))


@app.command()
def export(
    model: str = typer.Argument(..., help="Model URI: models:/<name>@<alias>, models:/<name>/<version>, runs:/..., "
                                "or a local model folder."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (e.g. unet.onnx); <file>.json beside it "
                                "says how to run it."),
    fmt: Optional[str] = option(ExportConfig, "format", "--format"),
    tracking_uri: Optional[str] = option(ExportConfig, "tracking_uri"),
    opset: Optional[int] = option(ExportConfig, "opset"),
    overwrite: bool = typer.Option(False, help="Replace an existing file at the output."),
    use_prefect: bool = PREFECT_OPT,
) -> None:
    """Export a model as one ONNX or TorchScript file that runs without this package, checked against torch."""

    def body() -> int:
        from unetcore.model import check_exportable, export_model

        cfg = _config(ExportConfig, model=model, output=str(output), format=fmt, tracking_uri=tracking_uri,
                      opset=opset, overwrite=overwrite)
        from flows.export import export as export_flow

        result = _flow_or_library(use_prefect, export_flow, lambda c: export_model(c).as_dict(), cfg,
                                  check_exportable)
        diffs = ", ".join(f"{v:.2g} at {k}" for k, v in result["max_abs_diff"].items())
        typer.echo(f"exported {model} -> {result['path']} ({result['format']})\n"
                   f"  checked against torch: max |diff| {diffs} (tolerance 1e-4)\n"
                   f"  how to run it: {result['description']}\n"
                   + (f"  logged to MLflow: {result['logged']}" if result["logged"]
                      else f"  not logged to MLflow: {result['not_logged']}"))
        return 0

    run_command(body, output)


@app.command()
def pipeline(
    images: Path = typer.Argument(..., help="Folder of training images."),
    masks: Path = typer.Option(..., help="Folder of training masks."),
    predict_images: Optional[Path] = typer.Option(None, help="Held-out images to predict after training."),
    predict_masks: Optional[Path] = typer.Option(None, help="Their masks (to report held-out Dice)."),
    workdir: Path = typer.Option(Path("work"), help="Folder for datasets, checkpoints, predictions."),
    epochs: Optional[int] = option(TrainConfig, "epochs"),
    steps_per_epoch: Optional[int] = option(TrainConfig, "steps_per_epoch"),
    patch_size: Optional[int] = option(TrainConfig, "patch_size"),
    batch_size: Optional[int] = option(TrainConfig, "batch_size"),
    num_classes: Optional[int] = option(IngestConfig, "num_classes"),
    time_budget_s: Optional[float] = option(TrainConfig, "time_budget_s"),
    tracking_uri: Optional[str] = option(TrainConfig, "tracking_uri"),
    workers: Optional[int] = option(InferConfig, "n_workers", "--workers"),
    scheduler_address: Optional[str] = option(InferConfig, "scheduler_address"),
) -> None:
    """Run ingest → train → predict as one Prefect flow."""

    def body() -> int:
        from unetcore.config import InferOptions, PipelineConfig, TrainOptions

        train_opts = _config(TrainOptions, epochs=epochs, steps_per_epoch=steps_per_epoch, patch_size=patch_size,
                             batch_size=batch_size, time_budget_s=time_budget_s)
        predict_opts = _config(InferOptions, n_workers=workers, scheduler_address=scheduler_address)
        cfg = _config(PipelineConfig, images=str(images), masks=str(masks),
                      predict_images=str(predict_images) if predict_images else None,
                      predict_masks=str(predict_masks) if predict_masks else None, workdir=str(workdir),
                      num_classes=num_classes, tracking_uri=tracking_uri, train=train_opts, predict=predict_opts)
        return _run_pipeline(cfg)

    run_command(body)


def _run_pipeline(cfg: Any) -> int:
    allow_embedded_server_startup()
    from flows.pipeline import pipeline as pipeline_flow
    from unetcore.ingest import check_ingestable
    from unetcore.tracking import browse_hint, check_tracking_uri

    for ingest_cfg in filter(None, (cfg.ingest_config(), cfg.holdout_config())):
        check_ingestable(ingest_cfg)
    check_tracking_uri(cfg.tracking_uri)
    check_prefect_api()
    start = time.perf_counter()
    with _progress_bar(), embedded_server_errors():
        result = pipeline_flow(cfg)
    elapsed = time.perf_counter() - start
    trained, predicted = result["train"], result["infer"]
    dices = [r["dice"] for r in predicted if r["dice"] is not None]
    typer.echo("\n== pipeline finished in %.0f s ==" % elapsed)
    typer.echo(f"dataset:       {cfg.workdir}/dataset/manifest.json")
    typer.echo(f"model:         {trained['model_name']} v{trained['model_version']} (alias '{trained['alias']}'), "
               f"val Dice {trained['best_val_dice']:.4f}")
    typer.echo(f"MLflow run:    {trained['run_id']} in {cfg.tracking_uri}\n"
               f"  browse:      {browse_hint(cfg.tracking_uri, trained['experiment_id'], trained['run_id'])}")
    typer.echo(f"serve it:      unet serve --tracking-uri {cfg.tracking_uri} --registered-model "
               f"{trained['model_name']}   (the nightly run then predicts with this champion)")
    typer.echo("predictions:")
    _print_predictions(predicted)
    if dices:
        typer.echo(f"held-out Dice: {sum(dices) / len(dices):.4f}")
    summary = {"seconds": round(elapsed, 1), "held_out_dice": sum(dices) / len(dices) if dices else None,
               "val_dice": trained["best_val_dice"], "run_id": trained["run_id"]}
    Path(cfg.workdir, "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


@app.command()
def demo(
    workdir: Path = typer.Option(Path("demo"), help="Folder for the sample, datasets, model and predictions."),
    epochs: int = typer.Option(12, help="Training epochs."),
    steps_per_epoch: int = typer.Option(40, help="Optimiser steps per epoch (the run's length is epochs x steps: "
                                        "a few minutes on 2 cores, the same model on an idle or a busy machine)."),
    large_size: int = typer.Option(2048, help="Edge of the held-out large image."),
    time_budget_s: float = typer.Option(0.0, help="Upper bound on training seconds (0 = none)."),
) -> None:
    """Generate the bundled sample and run the whole pipeline on it (embedded Prefect, sqlite MLflow, local Dask)."""

    def body() -> int:
        from unetcore.config import PipelineConfig, TrainOptions
        from unetcore.data.synthetic import write_sample

        sample = workdir / "sample"
        typer.echo(f"generating the sample in {sample} ...")
        write_sample(sample / "train", n_images=10, size=512, large_size=0, seed=0)
        write_sample(sample / "holdout", n_images=0, size=512, large_size=large_size, seed=1)
        cfg = PipelineConfig(
            images=str(sample / "train" / "images"), masks=str(sample / "train" / "masks"),
            predict_images=str(sample / "holdout" / "images"), predict_masks=str(sample / "holdout" / "masks"),
            workdir=str(workdir), tracking_uri=f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
            train=TrainOptions(epochs=epochs, steps_per_epoch=steps_per_epoch, patch_size=128, batch_size=8,
                               time_budget_s=time_budget_s, model=ModelConfig(base_channels=16, depth=4)),
        )
        return _run_pipeline(cfg)

    run_command(body)


STOP_GRACE_S = 8.0
"""After SIGTERM or Ctrl-C, the served deployments get this long to stop before their processes are killed."""

_SERVE_CHILD = """
import json, sys
from deployments.serve import serve_all
from unetcore.config import NightlyConfig
serve_all(NightlyConfig(**json.loads(sys.argv[1])), sys.argv[2], sys.argv[3])
"""


def serve_supervised(nightly_cfg: Any, cron: str, timezone: str, grace_s: float = STOP_GRACE_S) -> int:
    """Serve the deployments in a child process group and stop it within ``grace_s`` of SIGTERM or SIGINT.

    Prefect's runner stops gracefully on a signal, but when its server has gone away that stop waits on API
    retries. Supervisors (systemd, ``docker stop``, Kubernetes) send SIGTERM and expect an exit within ~10 s: the
    signal is passed on, and whatever still runs after ``grace_s`` (the runner, its flow runs) is killed.
    """
    import signal
    import subprocess

    cmd = [sys.executable, "-c", _SERVE_CHILD, nightly_cfg.model_dump_json(), cron, timezone]
    child = subprocess.Popen(cmd, start_new_session=True)
    stopping: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT)  # the runner's graceful stop (pauses the deployments)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    while child.poll() is None and not stopping:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)
    if stopping:
        try:
            child.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            typer.echo(f"serve: the deployments did not stop within {grace_s:.0f} s; killing them", err=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the runner and any flow run it started
        child.wait()
        return 0
    return child.returncode


@app.command()
def serve(
    nightly_images: str = typer.Option("inbox", help="Inbox the nightly deployment watches (folder or glob)."),
    nightly_workdir: Path = typer.Option(Path("nightly"), help="Nightly dataset/ and predictions/ go here."),
    tracking_uri: str = typer.Option(DEFAULT_TRACKING_URI, help="MLflow tracking URI the nightly run reads."),
    registered_model: str = typer.Option("unet", help="Registered model whose champion the nightly run uses."),
    cron: str = typer.Option("0 2 * * *", help="Nightly schedule (cron expression)."),
    timezone: str = typer.Option("Europe/Berlin", help="Time zone of the schedule (IANA name, e.g. UTC)."),
) -> None:
    """Serve all deployments (ingest, train, infer, pipeline, nightly on its schedule) from this process.

    Needs a Prefect server (PREFECT_API_URL); runs execute as subprocesses of this one until Ctrl-C.
    """

    def body() -> int:
        from unetcore.config import NightlyConfig

        nightly_cfg = _config(NightlyConfig, images=nightly_images, dataset=str(nightly_workdir / "dataset"),
                              output=str(nightly_workdir / "predictions"), tracking_uri=tracking_uri,
                              model_name=registered_model)
        from deployments.serve import nightly_schedule

        nightly_schedule(cron, timezone)
        url = check_prefect_api(required=True)
        typer.echo(f"serving ingest, train, infer, pipeline and nightly ({cron}, {timezone}) on {url}; "
                   f"UI: {url.rstrip('/').removesuffix('/api')}/deployments")
        return serve_supervised(nightly_cfg, cron, timezone)

    run_command(body)


def main() -> None:
    """Entry point of the ``unet`` console script."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry calls from the CLI
    app()


if __name__ == "__main__":
    main()
