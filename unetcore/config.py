"""Typed settings shared by the library, the CLI, the Prefect forms and the MLflow params.

One pydantic model per stage. Fields carry descriptions (Prefect renders them in its UI form), bounds and
``Literal`` choices, so a bad value is refused at the boundary with the field named.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from unetcore.errors import ConfigError
from unetcore.modes import (
    ChannelAxis,
    Device,
    ExportKind,
    LossKind,
    ModelFormat,
    NormalizationMode,
    NormKind,
    OptimizerKind,
    Precision,
    ProbabilityDtype,
    Runtime,
    SamplingKind,
    ScheduleKind,
    SpatialDims,
    SplitChoice,
    UpsampleKind,
)
from unetcore.redact import redact


class _Config(BaseModel):
    """Base: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def flat_params(self, prefix: str = "") -> dict[str, Any]:
        """Flatten to ``{"a.b": value}`` for MLflow params, with credentials in URLs redacted."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump(mode="json").items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                for sub, subval in value.items():
                    out[f"{name}.{sub}"] = redact(subval)
            else:
                out[name] = redact(value)
        return out


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""The one default MLflow store of every entry point: ``mlflow.db`` in the folder the command runs from."""


def validated(schema: type[BaseModel], /, **values: Any) -> Any:
    """Build ``schema(**values)``, turning pydantic's report into one :class:`ConfigError` line."""
    try:
        return schema(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or schema.__name__
        raise ConfigError(field, err["msg"]) from None


class ForegroundIntensity(_Config):
    """One channel's intensities over the training set's foreground, as ``ct`` normalisation uses them."""

    low: float = Field(description="Lower clip: the foreground's low_percentile over the training split.")
    high: float = Field(description="Upper clip: the foreground's high_percentile over the training split.")
    mean: float = Field(description="Mean of the (unclipped) foreground intensities.")
    std: float = Field(ge=0, description="Standard deviation of the (unclipped) foreground intensities.")


class NormalizationConfig(_Config):
    """How raw intensities become network inputs; stored with the model and applied at inference."""

    mode: NormalizationMode = Field(
        "percentile",
        description="percentile: clip to the image's [low, high] percentiles and scale to [0, 1]; "
        "zscore: subtract the image mean, divide by its std (MRI, microscopy); "
        "ct: clip to the training set's foreground [low, high] percentiles, then subtract the foreground mean and "
        "divide by its std (nnU-Net's CT scheme; fitted on the training split and stored with the model).",
    )
    low_percentile: float = Field(0.5, ge=0, le=50, description="Lower clip percentile (percentile and ct modes).")
    high_percentile: float = Field(99.5, ge=50, le=100,
                                   description="Upper clip percentile (percentile and ct modes).")
    foreground: list[ForegroundIntensity] | None = Field(
        None, description="ct mode: per channel, the training set's foreground clip range, mean and std "
        "(filled in by training from the ingested statistics; None until fitted).",
    )


class ModelConfig(_Config):
    """Architecture of the UNet; saved as JSON next to the weights and enough to rebuild the network."""

    in_channels: int = Field(1, ge=1, le=64, description="Input channels (1 grayscale, 3 RGB, n multi-channel).")
    num_classes: int = Field(
        1, ge=1, le=255, description="1 = binary (sigmoid); >= 2 = multi-class (softmax, class 0 background)."
    )
    depth: int = Field(4, ge=1, le=6, description="Number of 2x down-sampling stages.")
    base_channels: int = Field(16, ge=4, le=128, description="Channels of the first stage; doubled per stage.")
    norm: NormKind = Field("batch", description="Normalisation layer.")
    upsample: UpsampleKind = Field("transpose", description="Decoder up-sampling.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability in the bottleneck.")
    deep_supervision: bool = Field(
        False, description="Train with extra 1x1 heads on the decoder's coarser stages too, each halving weighted "
        "half as much (nnU-Net's deep supervision); prediction uses the full-resolution head only.")
    spatial_dims: SpatialDims = Field(
        2, description="2: a 2-D UNet (images; on volumes it trains on z-slices and predicts slice by slice, nnU-Net's "
        "\"2d\" configuration); 3: a 3-D UNet for volumes."
    )
    pool: list[list[int]] | None = Field(
        None, description="Pooling factor per stage and axis: depth lists of spatial_dims values, each 1 or 2 "
        "(e.g. [[1, 2, 2], [2, 2, 2]] for thick slices; see unetcore.model.plan_pooling). None = 2 along every axis.",
    )
    kernels: list[list[int]] | None = Field(
        None, description="Convolution kernel per stage and axis, stem first and bottleneck last: depth + 1 lists of "
        "spatial_dims odd values (e.g. [1, 3, 3] keeps slices apart). None = 3 along every axis.",
    )

    @model_validator(mode="after")
    def _per_axis_stages(self) -> ModelConfig:
        for name, stages, valid, what in (("pool", self.pool, {1, 2}, "1 or 2"),
                                          ("kernels", self.kernels, {1, 3, 5, 7}, "1, 3, 5 or 7")):
            if stages is None:
                continue
            n = self.depth + (name == "kernels")
            if len(stages) != n or any(len(s) != self.spatial_dims for s in stages):
                raise ValueError(f"{name} needs {n} lists of {self.spatial_dims} values (depth {self.depth}, "
                                 f"spatial_dims {self.spatial_dims}), got {stages}")
            if any(v not in valid for s in stages for v in s):
                raise ValueError(f"{name} values must be {what}, got {stages}")
        return self


class _IngestTarget(_Config):
    images: str = Field(description="Folder (or glob) of input images: TIFF, SVS, PNG, JPEG, NPY, Zarr.")
    masks: str | None = Field(None, description="Folder of masks with the same file stems as the images.")
    output: str = Field(description="Dataset folder to write (manifest.json + one <id>.ome.zarr per image).")


class IngestOptions(_Config):
    """How images are ingested, whatever the folders: chunking, splits, limits, parallelism."""

    chunk_size: int = Field(
        1024, ge=64, le=8192, description="Chunk edge in pixels (y and x); 1024 gives chunks of >= 1 MB."
    )
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of images in the validation split.")
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of images in the test split.")
    num_classes: int = Field(1, ge=1, le=255, description="Declared classes; mask values must be < max(2, this).")
    class_names: list[str] | None = Field(
        None, description="A name per class, background first (e.g. background,nucleus,membrane); kept in the "
        "manifest, recorded with models and predictions. Implies num_classes when that is not given (2 names: "
        "binary).")
    channel_axis: ChannelAxis = Field("auto", description="Channel layout of the inputs.")
    max_pixels: int = Field(
        50_000_000_000, ge=1, description="Refuse images with more pixels than this (decompression-bomb guard)."
    )
    force: bool = Field(False, description="Re-ingest images even if unchanged.")
    pyramid: bool = Field(True, description="Also write the multiscale pyramid (levels 1..n) for viewers.")
    mpp: float | None = Field(
        None, gt=0, le=10_000,
        description="Ingest 2-D images at this many microns per pixel (whole-slide images: e.g. 0.5): the pyramid "
        "level within 10 % of it, else the nearest finer level averaged down; needs a pixel size in the file "
        "(SVS MPP, OME PhysicalSizeX/Y, TIFF resolution). None = level 0 as it is.",
    )
    threads: int = Field(
        0, ge=0, le=64, description="Threads writing one image's chunks in parallel (0 = one per core, at most 8)."
    )
    n_workers: int = Field(
        0, ge=0, le=512,
        description="Ingest images in parallel on a local Dask cluster of this many processes (0 = one at a time).",
    )
    scheduler_address: str | None = Field(
        None, description="Existing Dask scheduler (tcp://host:port); its workers must see the input and output."
    )

    @model_validator(mode="after")
    def _fractions(self) -> IngestOptions:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self

    @model_validator(mode="after")
    def _names(self) -> IngestOptions:
        names = self.class_names
        if names is None:
            return self
        if len(names) < 2 or any(not n.strip() or "," in n for n in names) or len(set(names)) != len(names):
            raise ValueError("class_names needs 2 or more distinct, non-empty names without commas, background first")
        if "num_classes" not in self.model_fields_set:
            self.num_classes = 1 if len(names) == 2 else len(names)
        elif len(names) != max(2, self.num_classes):
            raise ValueError(f"{len(names)} class names for num_classes {self.num_classes} (a name per class, "
                             f"background first: {max(2, self.num_classes)})")
        return self


class IngestConfig(IngestOptions, _IngestTarget):
    """Options of ``ingest``: a folder of images (and masks) into a dataset of OME-Zarr stores."""

    def options(self) -> IngestOptions:
        """The options alone (what decides whether a stored image must be re-ingested, with its content)."""
        return IngestOptions(**{k: getattr(self, k) for k in IngestOptions.model_fields})


class _TrainTarget(_Config):
    dataset: str = Field(description="Dataset folder written by ingest.")


class TrainOptions(_Config):
    """The training recipe, whatever the dataset: model, patches, optimiser, schedule, loss, sampling, stopping."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="UNet architecture.")
    normalization: NormalizationConfig = Field(
        default_factory=NormalizationConfig, description="How intensities are normalised (stored with the model)."
    )
    patch_size: int | list[int] = Field(
        256, description="Training patch: an edge in pixels (a square; a cube for volumes), 16-2048, or one size per "
        "spatial axis ([z,] y, x), 4-2048 each.",
    )
    batch_size: int = Field(4, ge=1, le=512, description="Patches per optimiser step.")
    epochs: int = Field(
        10, ge=1, le=10_000, description="Training epochs (each ends with a validation; 10 fit ~10 min on 2 cores)."
    )
    steps_per_epoch: int = Field(50, ge=1, le=100_000, description="Optimiser steps per epoch.")
    lr: float = Field(2e-3, gt=0, le=1.0, description="Peak learning rate.")
    weight_decay: float = Field(1e-4, ge=0, le=1.0, description="Weight decay of the optimiser.")
    optimizer: OptimizerKind = Field("adamw", description="adamw, or sgd (Nesterov, momentum 0.99).")
    schedule: ScheduleKind = Field("poly", description="Learning-rate schedule.")
    loss: LossKind = Field("dice_ce", description="Training loss.")
    class_weights: list[float] | None = Field(
        None, description="Cross-entropy weight per class (num_classes values; [background, foreground] if binary)."
    )
    ignore_index: int | None = Field(
        None, ge=0, le=255, description="Mask value that counts in no loss or metric (e.g. unlabelled pixels)."
    )
    foreground_fraction: float = Field(
        0.33, ge=0.0, le=1.0, description="Share of each batch whose patch is centred on foreground."
    )
    sampling: SamplingKind = Field(
        "foreground",
        description="Where oversampled patches are centred: any foreground pixel, or a pixel of a class drawn "
        "uniformly from the classes present (rare classes as often as common ones).",
    )
    augment: bool = Field(True, description="Flips, rotations, scaling, intensity jitter, gamma, noise, blur.")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes (0 = in the training process).")
    grad_clip: float = Field(12.0, ge=0, description="Clip the gradient norm to this (0 = no clipping).")
    compile: bool = Field(False, description="torch.compile the training forward pass (slow start; pays off on GPU).")
    val_tile: int = Field(256, ge=16, le=4096, description="Sliding-window tile for validation of a 2-D model (a "
                          "3-D model validates with its training patch as tile).")
    hd95: bool = Field(False, description="Also compute the 95th-percentile Hausdorff distance (reads masks whole).")
    preview_every: int = Field(5, ge=1, description="Log a preview image every this many epochs (and the last).")
    patience: int = Field(0, ge=0, description="Stop after this many epochs without improvement (0 = never).")
    time_budget_s: float = Field(
        0.0, ge=0, description="Upper bound: stop after the epoch that passes this many seconds of training (0 = "
        "none; the length of a run is its epochs x steps_per_epoch, the same on any machine).",
    )
    seed: int = Field(0, ge=0, description="Seed of patch sampling, augmentation and initialisation.")
    device: Device = Field("auto", description="auto = CUDA if available, else CPU.")
    patch_shape: list[Annotated[int, Field(ge=1, le=2048)]] | None = Field(
        None, min_length=2, max_length=3,
        description="Training patch per spatial axis ([z,] y, x), e.g. [64, 128, 128] for volumes; None = "
        "patch_size on every axis.",
    )

    @field_validator("patch_size")
    @classmethod
    def _patch_in_bounds(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, int) and not 16 <= value <= 2048:
            raise ValueError(f"{value} is outside 16-2048 pixels")
        if isinstance(value, list) and (len(value) not in (2, 3) or not all(4 <= v <= 2048 for v in value)):
            raise ValueError(f"{value} needs 2 or 3 sizes ([z,] y, x) of 4-2048 each")
        return value

    @field_validator("class_weights")
    @classmethod
    def _class_weights_fit(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        model = info.data.get("model")
        expected = max(2, model.num_classes) if model else None
        if value is not None and expected and len(value) != expected:
            raise ValueError(f"needs {expected} values for model.num_classes={model.num_classes}, got {len(value)}")
        return value

    @field_validator("ignore_index")
    @classmethod
    def _ignore_is_no_class(cls, value: int | None, info: ValidationInfo) -> int | None:
        model = info.data.get("model")
        expected = max(2, model.num_classes) if model else 0
        if value is not None and value < expected:
            raise ValueError(f"{value} is a trained class; use a value >= {expected} (e.g. 255)")
        return value


class TrainConfig(TrainOptions, _TrainTarget):
    """Options of ``train``: the recipe, the data and where the run is tracked."""

    output: str = Field("runs/train", description="Folder for checkpoints and the exported model.")
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI (sqlite file or http URL).")
    experiment: str = Field("unet", description="MLflow experiment name.")
    registered_model: str = Field("unet", description="Name under which the model is registered.")
    resume: bool | None = Field(
        None,
        description="None (default): continue an unfinished run of the same recipe in `output` (its last.pt), so "
        "re-running the same command resumes; true: resume or refuse; false: start over (--restart).",
    )


class _InferTarget(_Config):
    dataset: str = Field(description="Dataset folder written by ingest.")
    output: str = Field(description="Folder for predictions (<id>.ome.zarr per image).")
    model: str = Field(
        "models:/unet@champion",
        description="Model URI: models:/<name>@<alias>, models:/<name>/<version>, runs:/..., or a local folder.",
    )
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI used to resolve models:/ URIs.")
    split: SplitChoice = Field("all", description="Which images of the dataset to predict.")
    images: list[str] = Field(default_factory=list, description="Predict only these image ids (empty = all).")


class InferOptions(_Config):
    """How images are predicted, whatever the dataset and model: tiles, blocks, outputs, cluster."""

    tile: int = Field(512, ge=16, le=4096, description="Tile edge fed to the network, on every axis it convolves. "
                      "When not given, a 3-D model uses its own tile (its training patch, in its config.json).")
    overlap: float = Field(0.125, ge=0.0, lt=1.0, description="Fraction of a tile shared with its neighbour (0.125 "
                           "of 512 = 64 px: labels at Dice 0.9999 vs the dense 256/0.5 grid for 1/3 of its forward "
                           "work, BENCHMARKS.md; 0.5 = the dense setting). A 3-D model without it set uses 0.5.")
    batch_size: int = Field(1, ge=1, le=256, description="Tiles per forward pass (one 512² tile holds the pixels of "
                            "four 256² ones). A 3-D model without it set uses 4.")
    block_size: int = Field(
        2048, ge=64, le=16384,
        description="Bounds one task's memory: a block holds at most block_size² pixels (voxels in a volume, the "
        "same budget); its shape (multiples of the output chunk) is chosen to compute the fewest tiles twice at "
        "block borders.",
    )
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Probability threshold (binary models).")
    save_probabilities: bool = Field(True, description="Write class probabilities as well as labels.")
    probability_dtype: ProbabilityDtype = Field("float16", description="Stored probability precision.")
    tta: bool = Field(False, description="Flip test-time augmentation (4 passes; 8 for a 3-D model).")
    precision: Precision = Field("auto", description="Forward passes: auto = bf16 autocast on CUDA (tiled == whole "
                                 "image within bf16's rounding), float32 on the CPU; fp32 = float32 on CUDA too; bf16 "
                                 "= bf16 autocast on the CPU too.")
    runtime: Runtime = Field("auto", description="What runs the forward passes: auto = onnxruntime on the CPU "
                             "(no torch import: about 2 s less per run; the model's ONNX graph is exported once "
                             "into <output>/.models), torch on a GPU, with bf16 or a remote scheduler; torch; "
                             "onnxruntime (the CPU only).")
    min_object_size: int = Field(
        0, ge=0, description="Remove objects and fill holes smaller than this many pixels (voxels), sizes measured "
        "on the whole image (not per block); 0 = keep all.",
    )
    skip_empty: bool = Field(True, description="Constant input tiles (padding, saturated background) get "
                             "background logits without running the model.")
    skip_background: bool | None = Field(
        None, description="Tiles entirely outside the tissue (foreground) mask, Otsu's threshold on the pyramid level "
        "of <= 2 MP dilated by one tile, are not computed and get exact background; nothing is skipped when the split "
        "is weak. None = on for slides (ingested with --mpp, or from a pyramidal TIFF), off for other images.",
    )
    instances: bool = Field(False, description="Also write instance labels (labels/instances, uint32): connected "
                            "components, one id per object even across block borders.")
    scheduler_address: str | None = Field(None, description="Existing Dask scheduler (tcp://host:port).")
    n_workers: int = Field(0, ge=0, le=512, description="Local cluster workers (0 = one per core; one per GPU).")
    threads_per_worker: int = Field(0, ge=0, le=512, description="Torch threads per local worker (0 = its share "
                                    "of the cores).")
    device: Device = Field("auto", description="auto = CUDA if available, else CPU.")
    export: ExportKind = Field("png", description="Also export label masks: png (small images; a volume gets a TIFF "
                               "stack), tiff (tiled BigTIFF with the pixel size; a volume: an ImageJ stack with its "
                               "spacing), nifti (a volume from NIfTI or DICOM, with its affine), geojson (2-D, with "
                               "instances: the instance outlines as a GeoJSON FeatureCollection QuPath and QGIS "
                               "import, and <id>_objects.csv), geotiff (an image from a GeoTIFF: tiled, overviews, "
                               "its georeferencing), none.")

    @field_validator("export")
    @classmethod
    def _geojson_needs_instances(cls, value: str, info: ValidationInfo) -> str:
        if value == "geojson" and not info.data.get("instances"):
            raise ValueError("geojson writes one outline per instance: add --instances")
        return value


class InferConfig(InferOptions, _InferTarget):
    """Options of ``predict``: tiled, blended inference of an ingested image on Dask."""

    overwrite: bool = Field(False, description="Replace an existing, different prediction.")


class ExportConfig(_Config):
    """Options of ``export``: one model written as a self-contained ONNX or TorchScript file, checked against torch."""

    model: str = Field(description="Model URI: models:/<name>@<alias>, models:/<name>/<version>, runs:/..., or a "
                       "local model folder.")
    output: str = Field(description="File to write (e.g. unet.onnx); its description goes beside it as <file>.json.")
    format: ModelFormat = Field("onnx", description="onnx: a graph for onnxruntime (or any ONNX runtime); "
                                "torchscript: a module for torch.jit.load, without this package.")
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI used to resolve models:/ URIs "
                              "and to log the export to the model's run.")
    opset: int = Field(17, ge=7, le=23, description="ONNX opset (onnx format); the dynamic padding needs 11 or later.")
    overwrite: bool = Field(False, description="Replace an existing file at the output.")


def given_options(options: TrainOptions) -> dict[str, Any]:
    """The training options set explicitly in ``options`` (not left at their defaults), as dotted TrainConfig
    fields (``model.depth``, ``patch_size``): what overrides the dataset's plan, field by field."""
    out: dict[str, Any] = {}
    for key, value in options.model_dump(exclude_unset=True).items():
        if key in ("model", "normalization") and isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


class PipelineConfig(_Config):
    """Options of ``pipeline``: ingest a labelled folder, train on it, predict held-out images.

    The stage options are the stages' own (``ingest``, ``train``, ``predict``), so a default changes in one place;
    ``num_classes`` is set once here for ingestion and the model.
    """

    images: str = Field(description="Folder of training images.")
    masks: str = Field(description="Folder of training masks (same file stems).")
    predict_images: str | None = Field(
        None, description="Folder of images to predict after training (default: the validation split)."
    )
    predict_masks: str | None = Field(None, description="Masks of predict_images, to report held-out Dice.")
    workdir: str = Field("work", description="Folder for datasets, checkpoints and predictions.")
    num_classes: int = Field(1, ge=1, le=255, description="1 = binary; >= 2 = multi-class (ingestion and model).")
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI.")
    registered_model: str = Field("unet", description="Registered model name.")
    ingest: IngestOptions = Field(default_factory=IngestOptions, description="How both folders are ingested.")
    train: TrainOptions = Field(default_factory=TrainOptions, description="The training recipe.")
    predict: InferOptions = Field(default_factory=InferOptions, description="How the held-out images are predicted.")

    def _ingest(self, images: str, masks: str | None, output: str, **override: Any) -> IngestConfig:
        values = {**self.ingest.model_dump(), "num_classes": self.num_classes, **override}
        return IngestConfig(images=images, masks=masks, output=output, **values)

    def ingest_config(self) -> IngestConfig:
        """The training dataset's ingestion."""
        return self._ingest(self.images, self.masks, f"{self.workdir}/dataset")

    def holdout_config(self) -> IngestConfig | None:
        """The held-out images' ingestion (all in one split, never trained on)."""
        if not self.predict_images:
            return None
        return self._ingest(self.predict_images, self.predict_masks, f"{self.workdir}/holdout", val_fraction=0.0,
                            test_fraction=0.0)

    def train_overrides(self) -> dict[str, Any]:
        """The training options given explicitly, as dotted TrainConfig fields: each overrides exactly its field of
        the dataset's plan (:func:`unetcore.planning.planned_config`); ``num_classes`` when it was given here."""
        out = given_options(self.train)
        if "num_classes" in self.model_fields_set:
            out["model.num_classes"] = self.num_classes
        return out

    def train_targets(self) -> dict[str, Any]:
        """Where the pipeline's training reads and writes (the TrainConfig fields that are not the recipe)."""
        return {"dataset": f"{self.workdir}/dataset", "output": f"{self.workdir}/train",
                "tracking_uri": self.tracking_uri, "registered_model": self.registered_model}

    def infer_config(self, model_uri: str) -> InferConfig:
        held_out = self.predict_images is not None
        return InferConfig(**self.predict.model_dump(exclude_unset=True),
                           dataset=f"{self.workdir}/holdout" if held_out else f"{self.workdir}/dataset",
                           split="all" if held_out else "val", output=f"{self.workdir}/predictions",
                           model=model_uri, tracking_uri=self.tracking_uri, overwrite=True)


class NightlyConfig(_Config):
    """Options of ``nightly``: ingest what is new in an inbox and predict it with the current champion model.

    Defaults suit a scheduled deployment run from the repository root: ``inbox/`` in, ``nightly/`` out. How images
    are ingested and predicted are the stages' own options (``ingest``, ``predict``).
    """

    images: str = Field(
        "inbox", min_length=1,
        description="Folder, or glob such as /data/inbox/*.tif, watched for new or changed images.",
    )
    masks: str | None = Field(None, description="Folder of ground-truth masks (same file stems), to report Dice.")
    dataset: str = Field("nightly/dataset", min_length=1, description="Dataset folder new images are ingested into.")
    output: str = Field(
        "nightly/predictions", min_length=1,
        description="Folder for predictions and nightly_state.json (image id -> source hash, model version).",
    )
    model_name: str = Field("unet", min_length=1, description="Registered MLflow model to predict with.")
    alias: str = Field(
        "champion", min_length=1, description="Alias of that model; resolved to one version at the start of the run."
    )
    tracking_uri: str = Field(DEFAULT_TRACKING_URI, description="MLflow tracking URI (sqlite file or http URL).")
    repredict_on_new_champion: bool = Field(
        True, description="Re-predict images made with an older model version when the alias has moved."
    )
    ingest: IngestOptions = Field(
        default_factory=lambda: IngestOptions(val_fraction=0.0),
        description="How new images are ingested (no validation split: nightly images are only predicted).",
    )
    predict: InferOptions = Field(default_factory=InferOptions, description="How new images are predicted.")

    def ingest_config(self) -> IngestConfig:
        """How each new image is ingested."""
        return IngestConfig(**self.ingest.model_dump(), images=self.images, masks=self.masks, output=self.dataset)

    def infer_config(self, model_uri: str, images: list[str]) -> InferConfig:
        """Inference of ``images`` with one pinned model version; stale predictions are replaced.

        Options left unset stay unset, so a 3-D model's own tile applies unless ``predict.tile`` was given.
        """
        return InferConfig(**self.predict.model_dump(exclude_unset=True), dataset=self.dataset, output=self.output,
                           model=model_uri, tracking_uri=self.tracking_uri, images=images, overwrite=True)
