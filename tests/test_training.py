"""Training: sampling, augmentation, the loop's recipe, resume, stopping rules and bad inputs.

Everything runs on tiny generated datasets (128² images, 64² patches) with tiny UNets (base 4-8, depth 2), so
each training takes a few seconds on two cores. One MLflow sqlite store serves the whole module (creating one
costs seconds); each test uses its own experiment and registered-model names.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from unetcore import training
from unetcore.config import IngestConfig, ModelConfig, NormalizationConfig, TrainConfig
from unetcore.data.synthetic import generate_image, instances_to_semantic, write_sample
from unetcore.errors import ConfigError, InputError, ServiceError
from unetcore.ingest import ingest_folder
from unetcore.store import manifest as mf
from unetcore.store.stats import fit_normalization
from unetcore.tracking import mlflow as tracking
from unetcore.tracking import runs
from unetcore.training import (
    AugmentConfig,
    EpochSampler,
    PatchDataset,
    augment_pair,
    class_locations,
    load_images,
    loop,
    validation,
)

TINY = ModelConfig(base_channels=8, depth=2)


def _ingest(root: Path, **options) -> Path:
    cfg = IngestConfig(images=str(root / "images"), masks=str(root / "masks"), output=str(root / "ds"), **options)
    assert ingest_folder(cfg).status == "ok"
    return root / "ds"


@pytest.fixture(scope="module")
def binary_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 128² nuclei images with 0/1 masks; at least one in the validation split."""
    root = tmp_path_factory.mktemp("binary")
    write_sample(root, n_images=5, size=128, large_size=0, seed=0)
    return _ingest(root)


@pytest.fixture(scope="module")
def three_class_ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 128² images with background / nucleus / boundary masks (classes 0, 1, 2)."""
    root = tmp_path_factory.mktemp("three")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(5):
        image, instances = generate_image((128, 128), seed=100 + i)
        Image.fromarray(image).save(root / "images" / f"img_{i}.png")
        Image.fromarray(instances_to_semantic(instances, "boundary")).save(root / "masks" / f"img_{i}.png")
    return _ingest(root, num_classes=3)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _cfg(dataset: Path, out: Path, uri: str, name: str, **options) -> TrainConfig:
    """A tiny recipe: 64² patches, batch 4, few steps; its own experiment and registered model."""
    values = dict(dataset=str(dataset), model=TINY, patch_size=64, batch_size=4, epochs=2, steps_per_epoch=4,
                  val_tile=64, output=str(out), tracking_uri=uri, experiment=name, registered_model=name)
    values.update(options)
    return TrainConfig(**values)


# --- sampling ---------------------------------------------------------------------------------------------


def _dataset(ds: Path, **options) -> PatchDataset:
    values = dict(patch_size=64, batch_size=3, steps=4, normalization=NormalizationConfig(),
                  foreground_fraction=1 / 3, augment=None, seed=7)
    values.update(options)
    return PatchDataset(load_images(ds, "train"), **values)


def test_patches_depend_only_on_seed_epoch_and_index(binary_ds: Path) -> None:
    a, b = _dataset(binary_ds, augment=AugmentConfig()), _dataset(binary_ds, augment=AugmentConfig())
    for i in (0, 5, 11):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    # index e * len + i is item i of epoch e: the same as selecting the epoch with set_epoch
    b.set_epoch(1)
    assert torch.equal(a[len(a) + 5][0], b[5][0])
    assert not torch.equal(a[5][0], b[5][0])
    assert not torch.equal(a[5][0], _dataset(binary_ds, augment=AugmentConfig(), seed=8)[5][0])


def test_batches_are_the_same_with_persistent_workers(binary_ds: Path, tmp_path: Path) -> None:
    """Workers hold their own dataset copy; the epoch rides in the index, so epoch 2 is epoch 2 there too."""
    batches = {}
    for workers in (0, 2):
        cfg = _cfg(binary_ds, tmp_path, "sqlite:///unused.db", "w", num_workers=workers, steps_per_epoch=2)
        loader, sampler = training.make_loader(cfg, binary_ds)
        got = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            got += [images for images, _ in loader]
        batches[workers] = got
        assert loader.persistent_workers == (workers > 0)
    assert len(batches[0]) == 4
    for serial, parallel in zip(batches[0], batches[2]):
        assert torch.equal(serial, parallel)
    assert not torch.equal(batches[0][0], batches[0][2])  # epochs differ


def test_epoch_sampler_yields_the_epochs_index_range() -> None:
    sampler = EpochSampler(4)
    sampler.set_epoch(2)
    assert list(sampler) == [8, 9, 10, 11] and len(sampler) == 4


def test_foreground_slots_always_hold_foreground(binary_ds: Path) -> None:
    data = _dataset(binary_ds, steps=30)  # batch 3, a third oversampled: item 2 of every batch
    assert data.n_fg == 1
    fg = [bool(data[i][1].any()) for i in range(len(data)) if data.is_foreground_slot(i)]
    assert len(fg) == 30 and all(fg)


def test_default_oversamples_a_third_of_each_batch() -> None:
    cfg = TrainConfig(dataset="x")
    assert cfg.foreground_fraction == pytest.approx(1 / 3, abs=0.01)
    assert cfg.sampling == "foreground"


def test_class_balanced_sampling_centres_the_rare_class_half_the_time(three_class_ds: Path) -> None:
    """Boundary pixels are ~20 % of foreground: class-balanced slots centre on them ~50 % of the time."""
    images = load_images(three_class_ds, "train")
    share = {}
    for mode in ("foreground", "class_balanced"):
        # 2² patches: the sampled pixel is at (1, 1) unless it lies on the image's first row or column
        data = PatchDataset(images, 2, 1, 400, NormalizationConfig(), 1.0, None, seed=1, sampling=mode)
        centres = [int(data[i][1][1, 1]) for i in range(len(data))]
        share[mode] = centres.count(2) / max(1, centres.count(1) + centres.count(2))
    assert share["foreground"] < 0.35
    assert 0.4 < share["class_balanced"] < 0.6


@pytest.mark.parametrize(
    ("labels", "ignore", "expected"),
    [
        (np.array([[0, 1], [2, 1]]), None, {1: [[0, 1], [1, 1]], 2: [[1, 0]]}),
        (np.array([[0, 1], [2, 1]]), 2, {1: [[0, 1], [1, 1]]}),
        (np.zeros((2, 2), int), None, {}),
    ],
)
def test_class_locations(labels: np.ndarray, ignore: int | None, expected: dict) -> None:
    got = class_locations(labels, ignore)
    assert {k: v.tolist() for k, v in got.items()} == expected


def test_class_locations_keep_at_most_the_cap() -> None:
    got = class_locations(np.ones((100, 100), int), max_per_class=50)
    assert got[1].shape == (50, 2) and len({tuple(c) for c in got[1]}) == 50


def test_image_patches_may_be_rectangular_and_ct_normalised(binary_ds: Path) -> None:
    """A patch shape per axis works for images too, and ct fits on their ingested foreground statistics."""
    entries = [e for e in mf.entries(mf.load(binary_ds), "train") if e["has_mask"]]
    assert all(e["foreground_stats"]["pixels"] > 0 for e in entries)
    recipe = fit_normalization(NormalizationConfig(mode="ct"), entries)
    (fitted,) = recipe.foreground
    low, high = (np.array([fitted.low, fitted.high]) - fitted.mean) / fitted.std
    plain = _dataset(binary_ds, patch_size=(32, 48), normalization=recipe)
    turned = _dataset(binary_ds, patch_size=(32, 48), normalization=recipe, augment=AugmentConfig(p_rot90=1))
    values = []
    for i in range(6):
        image, target = plain[i]
        assert image.shape == (1, 32, 48) and target.shape == (32, 48)
        assert turned[i][0].shape == (1, 32, 48) and turned[i][1].shape == (32, 48)  # half turns only
        values.append(image)
    values = torch.cat([v.flatten() for v in values])
    assert values.min() >= low - 1e-5 and values.max() <= high + 1e-5  # clipped to the foreground's range
    assert fitted.low > 0 and values.min() == pytest.approx(low, abs=1e-5)  # dark background sits at the clip


# --- augmentation -----------------------------------------------------------------------------------------


def test_augmentation_keeps_mask_values_exact() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((2, 64, 64), dtype=np.float32)
    mask = rng.integers(0, 3, (64, 64))
    everything = AugmentConfig(p_flip=1, p_rot90=1, p_affine=1, p_intensity=1, p_gamma=1, p_noise=1, p_blur=1)
    for seed in range(5):
        out_image, out_mask = augment_pair(image, mask, np.random.default_rng(seed), everything)
        assert out_image.shape == (2, 64, 64) and out_image.dtype == np.float32
        assert out_mask.shape == (64, 64) and set(np.unique(out_mask)) <= {0, 1, 2}


def test_flip_only_augmentation_moves_image_and_mask_together() -> None:
    image = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    mask = (image[0] % 3).astype(np.int64)  # the mask is a function of the image: must stay so
    flips = AugmentConfig(p_flip=1, p_rot90=1, p_affine=0, p_intensity=0, p_gamma=0, p_noise=0, p_blur=0)
    out_image, out_mask = augment_pair(image, mask, np.random.default_rng(3), flips)
    assert not np.array_equal(out_image, image)
    assert np.array_equal(out_mask, (out_image[0] % 3).astype(np.int64))


# --- the loop ---------------------------------------------------------------------------------------------


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder, map_location="cpu", weights_only=True)["model"]


def test_resume_gives_the_weights_and_metrics_of_an_uninterrupted_run(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 epochs straight == 2 epochs, a crash, then resume: same weights, each epoch's metrics logged once.

    The crash comes after epoch 1's checkpoint but before its metrics reach MLflow, the worst moment: the
    resume must log them from the checkpoint, and must not log epoch 0's again.
    """
    straight = training.train(_cfg(binary_ds, tmp_path / "a", tracking_uri, "resume-a", epochs=4))

    real_log = runs.log_epoch

    def crash_at_epoch_1(metrics: dict[str, float], epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt("simulated crash")
        real_log(metrics, epoch)

    monkeypatch.setattr(runs, "log_epoch", crash_at_epoch_1)
    cfg = _cfg(binary_ds, tmp_path / "b", tracking_uri, "resume-b", epochs=4)
    with pytest.raises(KeyboardInterrupt):
        training.train(cfg)
    monkeypatch.setattr(runs, "log_epoch", real_log)
    resumed = training.train(cfg.model_copy(update={"resume": True}))

    a, b = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    client = MlflowClient(tracking_uri)
    for key in ("train_loss", "val_dice", "lr", "images_per_s"):
        history = client.get_metric_history(resumed.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2, 3], key
    losses = {m.step: m.value for m in client.get_metric_history(straight.run_id, "train_loss")}
    for m in client.get_metric_history(resumed.run_id, "train_loss"):
        assert m.value == pytest.approx(losses[m.step], rel=1e-4)
    run = client.get_run(resumed.run_id)
    assert run.data.tags["resumed_at_epoch"] == "2"  # epoch 1 was checkpointed before the crash
    assert run.info.status == "FINISHED"
    assert resumed.epochs_run == 4 and resumed.best_val_dice == pytest.approx(straight.best_val_dice, abs=1e-4)


def test_resume_refuses_a_checkpoint_of_another_recipe(binary_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    cfg = _cfg(binary_ds, tmp_path, tracking_uri, "foreign", epochs=1, steps_per_epoch=1)
    training.train(cfg)
    with pytest.raises(ConfigError, match="lr"):
        training.train(cfg.model_copy(update={"resume": True, "epochs": 2, "lr": 0.1}))
    with pytest.raises(ConfigError, match="raise --epochs"):  # finished and registered: nothing left to do
        training.train(cfg.model_copy(update={"resume": True}))


def test_checkpointed_rng_state_round_trips_on_cpu(tmp_path: Path) -> None:
    """The saved CPU generator state, read back and restored, replays the same draws; no CUDA state on CPU."""
    cpu = torch.device("cpu")
    torch.manual_seed(5)
    training.save_checkpoint(tmp_path / training.CHECKPOINT, {"rng": training.rng_state(cpu)})
    expected = torch.rand(8)
    torch.rand(3)
    state = training.load_checkpoint(tmp_path / training.CHECKPOINT)["rng"]
    assert set(state) == {"torch"}
    training.set_rng_state(state, cpu)
    assert torch.equal(torch.rand(8), expected)


def test_cuda_rng_state_is_the_training_devices_and_restored_only_where_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One GPU's state is saved (not every visible GPU's); it is restored only if that GPU exists here."""
    saved, restored = torch.arange(4, dtype=torch.uint8), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    gpu = torch.device("cuda", 1)
    state = training.rng_state(gpu)
    assert state["cuda"] is saved
    for available, count in ((False, 0), (True, 1)):  # no GPU; one GPU, so no cuda:1
        monkeypatch.setattr(torch.cuda, "is_available", lambda a=available: a)
        monkeypatch.setattr(torch.cuda, "device_count", lambda c=count: c)
        training.set_rng_state(state, gpu)
        assert restored == []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    training.set_rng_state(state, gpu)
    training.set_rng_state({**state, "cuda": [torch.zeros(4, dtype=torch.uint8), saved]}, gpu)  # older: per GPU
    assert [(s is saved, d) for s, d in restored] == [(True, gpu), (True, gpu)]


def _scripted_dice(monkeypatch: pytest.MonkeyPatch, scores: list[float]) -> None:
    """Replace validation by a script of val Dice values, one per call."""
    it = iter(scores)

    def fake(*args, **kwargs) -> dict[str, float]:
        return {"val_dice": next(it), "val_iou": 0.5}

    monkeypatch.setattr(validation, "evaluate", fake)


def test_early_stopping_after_patience_epochs_without_improvement(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EMA (0.9) of 0.5, 0.6, 0.4, 0.4, 0.4: 0.5, 0.51, 0.499, ... best at epoch 1, then 2 bad epochs
    _scripted_dice(monkeypatch, [0.5, 0.6, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4] + [0.4] * 4)
    cfg = _cfg(binary_ds, tmp_path, tracking_uri, "patience", epochs=8, steps_per_epoch=1, patience=2)
    result = training.train(cfg)
    assert result.stop_reason == "patience"
    assert result.epochs_run == 4 and result.best_epoch == 1
    assert result.best_val_dice == pytest.approx(0.6)  # the best epoch's own Dice, chosen by its EMA


def test_time_budget_stops_after_the_current_epoch(binary_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    result = training.train(_cfg(binary_ds, tmp_path, tracking_uri, "budget", epochs=50, time_budget_s=1e-3))
    assert result.stop_reason == "time_budget" and result.epochs_run == 1
    assert (tmp_path / "last.pt").exists() and result.model_version == 1  # still checkpointed and registered


def test_three_class_training_reports_per_class_dice(three_class_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    cfg = _cfg(three_class_ds, tmp_path, tracking_uri, "three", model=ModelConfig(base_channels=8, depth=2, num_classes=3),
               sampling="class_balanced", epochs=3, steps_per_epoch=8, hd95=True)
    result = training.train(cfg)
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    metrics = run.data.metrics
    for key in ("val_dice_class1", "val_dice_class2", "val_iou_class1", "val_iou_class2", "val_hd95"):
        assert key in metrics, key
    assert metrics["val_dice_class1"] > 0.5  # nuclei are learnt within a few steps
    assert metrics["val_dice"] == pytest.approx((metrics["val_dice_class1"] + metrics["val_dice_class2"]) / 2)
    assert metrics["val_truth_empty_class1"] == 0 and metrics["val_truth_empty_class2"] == 0
    assert run.data.params["sampling"] == "class_balanced"


def test_ignore_label_is_left_out_of_loss_and_metrics(three_class_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    """A binary model on the 3-class masks with the boundary class (2) as the ignore label trains and scores."""
    cfg = _cfg(three_class_ds, tmp_path, tracking_uri, "ignore", ignore_index=2, class_weights=[1.0, 2.0])
    result = training.train(cfg)
    metrics = MlflowClient(tracking_uri).get_run(result.run_id).data.metrics
    assert "val_dice_class1" in metrics and "val_dice_class2" not in metrics
    with pytest.raises(ConfigError, match="class 2"):  # without the ignore label, class 2 is undeclared
        training.train(cfg.model_copy(update={"ignore_index": None, "class_weights": None}))


def test_evaluate_makes_empty_ground_truth_explicit(binary_ds: Path) -> None:
    """A model that predicts nothing on a set whose truth holds nothing: Dice undefined (NaN), flagged."""
    from unetcore.inference.predict import BlockPredictor
    from unetcore.store import manifest as mf

    def nothing(batch: np.ndarray) -> np.ndarray:
        return np.full((batch.shape[0], 1, *batch.shape[2:]), -10.0, np.float32)

    predictor = BlockPredictor(nothing, 1, NormalizationConfig(), tile=64, overlap=0.5, batch_size=4)
    entries = mf.entries(mf.require(binary_ds), "val")
    scores = training.evaluate(predictor, binary_ds, entries)
    assert scores["val_dice"] == 0.0 and scores["val_truth_empty_class1"] == 0.0  # truth has nuclei: Dice 0
    scores = training.evaluate(predictor, binary_ds, entries, ignore_index=1)  # every nucleus pixel ignored
    assert np.isnan(scores["val_dice"]) and scores["val_truth_empty_class1"] == 1.0


# --- bad inputs: refused before any compute, one line naming the thing ----------------------------------


def test_dataset_without_masks_is_refused(tmp_path: Path, tracking_uri: str) -> None:
    write_sample(tmp_path / "raw", n_images=2, size=64, large_size=0)
    cfg = IngestConfig(images=str(tmp_path / "raw/images"), output=str(tmp_path / "ds"))
    ingest_folder(cfg)
    with pytest.raises(InputError, match="no image in the dataset has a mask"):
        training.train(_cfg(tmp_path / "ds", tmp_path / "out", tracking_uri, "nomask"))


def test_masks_with_undeclared_classes_are_refused(three_class_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.num_classes.*class 2"):
        training.train(_cfg(three_class_ds, tmp_path, tracking_uri, "undeclared"))  # binary model, classes 0..2


def test_empty_validation_split_is_refused(tmp_path: Path, tracking_uri: str) -> None:
    write_sample(tmp_path, n_images=2, size=64, large_size=0)
    ds = _ingest(tmp_path, val_fraction=0.0)
    with pytest.raises(InputError, match="validation split is empty"):
        training.train(_cfg(ds, tmp_path / "out", tracking_uri, "noval"))


def test_patch_larger_than_every_image_is_refused(binary_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"patch_size.*256.*128"):
        training.train(_cfg(binary_ds, tmp_path, tracking_uri, "patch", patch_size=256))


def test_unreachable_tracking_server_fails_fast_before_training(binary_ds: Path, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ServiceError, match="127.0.0.1:9"):
        training.train(_cfg(binary_ds, tmp_path / "out", "http://127.0.0.1:9", "down"))
    assert time.perf_counter() - t0 < 10
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_train_runs_its_preflight_checks_once(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_trainable is the one pre-flight (dataset, then tracking store); train() runs it, and the URI check,
    exactly once."""
    inputs = training.check_trainable(_cfg(binary_ds, tmp_path, tracking_uri, "checks"))
    assert isinstance(inputs, training.TrainInputs) and inputs.val_entries
    assert all(e["split"] == "val" and e["has_mask"] for e in inputs.val_entries)
    calls = {"check_trainable": 0, "check_tracking_uri": 0}

    def count(module: object, name: str) -> None:
        real = getattr(module, name)

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(loop, "check_trainable")
    count(tracking, "check_tracking_uri")
    training.train(_cfg(binary_ds, tmp_path, tracking_uri, "checks", epochs=1, steps_per_epoch=1))
    assert calls == {"check_trainable": 1, "check_tracking_uri": 1}


def test_class_weights_must_match_the_classes() -> None:
    from unetcore.config import validated

    with pytest.raises(ConfigError, match="class_weights"):
        validated(TrainConfig, dataset="x", model=ModelConfig(num_classes=3), class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="ignore_index"):
        validated(TrainConfig, dataset="x", model=ModelConfig(num_classes=3), ignore_index=2)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [("constant", [1.0, 1.0, 1.0]), ("poly", [1.0, 0.5**0.9, 0.0]), ("cosine", [0.5, 1.0, 0.0])],
)
def test_lr_schedules(schedule: str, expected: list[float]) -> None:
    """Factors at steps 0, total/2 (+warm-up for cosine) and total; cosine warms up over 5 % of the steps."""
    factor = training.lr_lambda(TrainConfig(dataset="x", schedule=schedule), 40)
    steps = [0, 20, 40] if schedule != "cosine" else [0, 1, 40]
    assert [factor(s) for s in steps] == pytest.approx(expected)
    if schedule == "cosine":  # after the 2 warm-up steps, half a cosine period over the remaining 38
        cosine = [0.5 * (1 + np.cos(np.pi * (s - 2) / 38)) for s in range(2, 41)]
        assert [factor(s) for s in range(2, 41)] == pytest.approx(cosine, abs=1e-9)
        assert factor(11) == pytest.approx(0.8679, abs=1e-4)  # a linear decay gives 1 - 9/38 = 0.763 here


def test_sgd_is_nesterov_with_high_momentum() -> None:
    opt = training.make_optimizer(TrainConfig(dataset="x", optimizer="sgd", lr=0.01), torch.nn.Linear(2, 2))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.99


def test_training_logs_lr_throughput_previews_and_code_version(
    binary_ds: Path, tracking_uri: str, tmp_path: Path
) -> None:
    result = training.train(_cfg(binary_ds, tmp_path, tracking_uri, "logged", epochs=3, preview_every=2),
                        tags={"prefect_flow_run_id": "abc"})
    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    for key in ("train_loss", "val_dice", "val_iou", "val_dice_class1", "lr", "images_per_s", "ema_val_dice"):
        assert len(client.get_metric_history(result.run_id, key)) == 3, key
    assert run.data.tags["prefect_flow_run_id"] == "abc"
    assert run.data.tags["code_version"] and run.data.tags["package_version"]
    assert len(run.data.tags["manifest_hash"]) == 32
    assert run.data.params["loss"] == "dice_ce" and run.data.params["model.base_channels"] == "8"
    previews = [a.path for a in client.list_artifacts(result.run_id, "images")]
    assert sum("preview" in p and p.endswith(".png") for p in previews) == 2  # epochs 0 and 2 (the last)


@pytest.mark.slow
def test_compiled_forward_trains_like_eager(binary_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    """compile=True (torch.compile, CPU inductor) gives the eager run's losses: same model, faster kernels."""
    losses: dict[bool, float] = {}
    for compiled in (False, True):
        cfg = _cfg(binary_ds, tmp_path / str(compiled), tracking_uri, f"compile-{compiled}", epochs=1,
                   steps_per_epoch=3, model=ModelConfig(base_channels=4, depth=2), compile=compiled)
        training.train(cfg, on_epoch=lambda e, m, c=compiled: losses.__setitem__(c, m["train_loss"]))
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# --- what a re-run of the same command does ---------------------------------------------------------------------


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def test_an_interrupt_before_the_first_epoch_keeps_nothing_and_says_so(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.loop, "train_step", interrupted)
    cfg = _cfg(binary_ds, tmp_path, tracking_uri, "early-stop")
    with pytest.raises(training.TrainingInterrupted, match="nothing was kept") as err:
        training.train(cfg)
    assert "resume" not in err.value.message.split("nothing was kept")[0]
    assert not (tmp_path / training.CHECKPOINT).exists()
    assert _runs(tracking_uri, "early-stop") == []  # no empty FAILED run left behind


def test_the_same_command_resumes_an_interrupted_run(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_log = runs.log_epoch

    def stop_after_epoch_0(metrics: dict[str, float], epoch: int) -> None:
        real_log(metrics, epoch)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(runs, "log_epoch", stop_after_epoch_0)
    cfg = _cfg(binary_ds, tmp_path, tracking_uri, "same-command", epochs=3)
    with pytest.raises(training.TrainingInterrupted, match="re-run the same command to resume") as err:
        training.train(cfg)
    assert "after epoch 1 of 3" in err.value.message
    [killed] = _runs(tracking_uri, "same-command")
    assert killed.info.status == "KILLED"
    monkeypatch.setattr(runs, "log_epoch", real_log)

    result = training.train(cfg)  # the very same config: no --resume needed
    [run] = _runs(tracking_uri, "same-command")
    assert run.info.run_id == killed.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_at_epoch"] == "1" and result.epochs_run == 3

    again = training.train(cfg)  # finished and registered: the same command now trains a new run
    assert again.run_id != result.run_id and len(_runs(tracking_uri, "same-command")) == 2


def test_an_unfinished_run_of_another_recipe_is_never_overwritten_silently(
    binary_ds: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_log = runs.log_epoch

    def stop(metrics: dict[str, float], epoch: int) -> None:
        real_log(metrics, epoch)
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "log_epoch", stop)
    cfg = _cfg(binary_ds, tmp_path, tracking_uri, "other-recipe", epochs=3)
    with pytest.raises(training.TrainingInterrupted):
        training.train(cfg)
    monkeypatch.setattr(runs, "log_epoch", real_log)
    before = (tmp_path / training.CHECKPOINT).read_bytes()
    with pytest.raises(ConfigError, match="--restart"):
        training.train(cfg.model_copy(update={"lr": 0.05}))
    assert (tmp_path / training.CHECKPOINT).read_bytes() == before
    restarted = training.train(cfg.model_copy(update={"lr": 0.05, "resume": False}))
    assert restarted.epochs_run == 3 and "resumed_at_epoch" not in MlflowClient(tracking_uri).get_run(
        restarted.run_id).data.tags


def test_deep_supervision_trains_through_every_head_and_packages_a_predicting_model(
        binary_ds: Path, tracking_uri: str, tmp_path: Path) -> None:
    """A step's loss is the weighted sum over the three outputs (the heads get gradients); the saved model keeps
    the heads and predicts with the full-resolution one."""
    from unetcore.model import build_model, load_model
    from unetcore.training.losses import DeepSupervisionLoss, SegmentationLoss

    model_cfg = ModelConfig(base_channels=4, depth=4, deep_supervision=True)
    torch.manual_seed(0)
    model = build_model(model_cfg)
    batch = (torch.randn(2, 1, 64, 64), torch.randint(0, 2, (2, 64, 64)))
    loss_fn = DeepSupervisionLoss(SegmentationLoss("dice_ce", 1))
    training.train_step(model.forward_deep, list(model.parameters()), batch, loss_fn,
                        torch.optim.SGD(model.parameters(), lr=0.0), torch.device("cpu"), 0.0)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_heads.parameters())
    result = training.train(_cfg(binary_ds, tmp_path, tracking_uri, "deep", model=model_cfg, epochs=1,
                                 steps_per_epoch=3))
    assert result.model_version == 1
    saved, config = load_model(tmp_path / "best")
    assert config["model"]["deep_supervision"] is True and saved.aux_heads is not None
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert saved.eval()(x).shape == (1, 1, 64, 64)
