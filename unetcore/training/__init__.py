"""Training: patch sampling and augmentation, losses, the loop, checkpoints and whole-image validation."""

from unetcore.training.augment import AugmentConfig, augment_pair
from unetcore.training.checkpoint import (
    BEST,
    CHECKPOINT,
    LoopState,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from unetcore.training.loop import (
    TrainingInterrupted,
    TrainInputs,
    TrainResult,
    check_trainable,
    make_loader,
    memory_format,
    train,
    train_step,
    training_patch,
    validation_tile,
)
from unetcore.training.losses import DeepSupervisionLoss, SegmentationLoss, deep_supervision_weights
from unetcore.training.optim import lr_lambda, make_optimizer, make_scheduler
from unetcore.training.sampler import (
    ChunkCache,
    EpochSampler,
    PatchDataset,
    class_locations,
    load_images,
    pad_to,
    patch_shape,
    slice_patch,
)
from unetcore.training.validation import Validation, evaluate

__all__ = [
    "BEST",
    "CHECKPOINT",
    "AugmentConfig",
    "ChunkCache",
    "EpochSampler",
    "LoopState",
    "PatchDataset",
    "SegmentationLoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "TrainingInterrupted",
    "TrainInputs",
    "TrainResult",
    "Validation",
    "augment_pair",
    "check_trainable",
    "class_locations",
    "evaluate",
    "load_checkpoint",
    "load_images",
    "lr_lambda",
    "make_loader",
    "memory_format",
    "make_optimizer",
    "make_scheduler",
    "pad_to",
    "patch_shape",
    "slice_patch",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "train",
    "train_step",
    "training_patch",
    "validation_tile",
]
