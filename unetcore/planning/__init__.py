"""Planning from the data: a dataset's fingerprint decides the training recipe, each choice with its reason.

:func:`fingerprint` reads what ingestion measured; :func:`plan_dataset` turns it into a :class:`Plan`;
:func:`planned_config` gives the :class:`~unetcore.config.TrainConfig` that trains, explicit options on top; a
model records its :class:`TaskSignature`, which the champion gate and prediction check.
"""

from unetcore.model import MIN_FEATURE_MAP, PoolingPlan, deepest, plan_pooling
from unetcore.planning.fingerprint import (
    AxisSpread,
    ChannelSummary,
    DatasetFingerprint,
    ImageFingerprint,
    fingerprint,
    modality_hint,
    model_classes,
    pool_channels,
    pooled_percentile,
)
from unetcore.planning.plan import (
    MEMORY_BUDGET_BYTES,
    PLAN_FILE,
    PLAN_ONLY,
    WORK_PIXELS,
    Choice,
    PatchPlan,
    Plan,
    pipeline_training,
    plan_batch,
    plan_dataset,
    plan_from_fingerprint,
    plan_patch,
    plan_sampling,
    plan_steps,
    planned_config,
    planned_training,
    training_bytes,
    write_plan,
)
from unetcore.planning.task import (
    TaskSignature,
    dataset_model_name,
    target_spacing,
    trained_spacing,
    training_task,
    working_spacing,
)

__all__ = [
    "MEMORY_BUDGET_BYTES",
    "MIN_FEATURE_MAP",
    "PLAN_FILE",
    "PLAN_ONLY",
    "WORK_PIXELS",
    "AxisSpread",
    "ChannelSummary",
    "Choice",
    "DatasetFingerprint",
    "ImageFingerprint",
    "PatchPlan",
    "Plan",
    "PoolingPlan",
    "TaskSignature",
    "dataset_model_name",
    "deepest",
    "fingerprint",
    "modality_hint",
    "model_classes",
    "pipeline_training",
    "plan_batch",
    "plan_dataset",
    "plan_from_fingerprint",
    "plan_patch",
    "plan_pooling",
    "plan_sampling",
    "plan_steps",
    "planned_config",
    "planned_training",
    "pool_channels",
    "pooled_percentile",
    "target_spacing",
    "trained_spacing",
    "training_bytes",
    "training_task",
    "working_spacing",
    "write_plan",
]
