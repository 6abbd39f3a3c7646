"""Tiled, blended inference: pure tiling geometry and blending, the block predictor, and the Dask engine.

Entry points: :func:`check_predictable` (every check before work), :func:`predict_dataset` (a dataset's chosen
images) and :func:`predict_entries` (given manifest entries with a pinned model, e.g. nightly's new images).
"""

from unetcore.inference.components import (
    BlockComponents,
    Merged,
    instances_blockwise,
    label_block,
    label_blockwise,
    merge_faces,
    postprocess_blockwise,
    postprocess_whole,
)
from unetcore.inference.engine import (
    ImageResult,
    PredictionCheck,
    check_predictable,
    logs_to,
    predict_dataset,
    predict_entries,
    predict_image,
    results_to_dicts,
)
from unetcore.inference.layout import output_store, records_dir
from unetcore.inference.outputs import dice_from_records, export_mask, write_preview
from unetcore.inference.plan import ImagePlan, chosen_entries, plan_image
from unetcore.inference.predict import (
    BlockPredictor,
    logits_to_outputs,
    resolve_device,
    torch_predictor,
)
from unetcore.inference.stitch import (
    BACKGROUND_LOGIT,
    background_logits,
    constant_tiles,
    predict_block,
    predict_blocks_numpy,
    read_padded,
    skip_empty_predictor,
    sliding_window,
    tta_predictor,
)
from unetcore.inference.tasks import (
    ModelSpec,
    load_predictor,
    set_worker_predictor_factory,
    worker_predictor,
)
from unetcore.inference.windows import (
    Block,
    TileGrid,
    choose_block_shape,
    gaussian_weights,
    padded_shape,
    plan_blocks,
    region_for_tiles,
    tile_evaluations,
    tile_starts,
    tiles_for_block,
)

__all__ = [
    "BACKGROUND_LOGIT",
    "Block",
    "BlockComponents",
    "BlockPredictor",
    "ImagePlan",
    "ImageResult",
    "Merged",
    "ModelSpec",
    "PredictionCheck",
    "TileGrid",
    "background_logits",
    "check_predictable",
    "choose_block_shape",
    "chosen_entries",
    "constant_tiles",
    "dice_from_records",
    "export_mask",
    "gaussian_weights",
    "instances_blockwise",
    "label_block",
    "label_blockwise",
    "load_predictor",
    "logits_to_outputs",
    "logs_to",
    "merge_faces",
    "output_store",
    "padded_shape",
    "plan_blocks",
    "plan_image",
    "postprocess_blockwise",
    "postprocess_whole",
    "predict_block",
    "predict_blocks_numpy",
    "predict_dataset",
    "predict_entries",
    "predict_image",
    "read_padded",
    "records_dir",
    "region_for_tiles",
    "resolve_device",
    "results_to_dicts",
    "set_worker_predictor_factory",
    "skip_empty_predictor",
    "sliding_window",
    "tile_evaluations",
    "tile_starts",
    "tiles_for_block",
    "torch_predictor",
    "tta_predictor",
    "worker_predictor",
    "write_preview",
]
