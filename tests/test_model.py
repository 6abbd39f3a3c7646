"""UNet shapes for any image or volume size, gradients, determinism, pooling plans, and weights-only save/load."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from unetcore.config import ModelConfig
from unetcore.errors import InputError
from unetcore.model import UNet, build_model, crop, load_model, plan_pooling, save_model, size_multiple
from unetcore.model.parts import fold_batch_norm, group_count
from unetcore.model.unet import pad_to_multiple, padded_size


def tiny(**overrides: object) -> ModelConfig:
    """A small, fast architecture."""
    return ModelConfig(**{"base_channels": 4, "depth": 2, **overrides})


@pytest.mark.parametrize(
    ("size", "multiple", "expected"),
    [(1, 4, 8), (8, 4, 8), (9, 4, 12), (33, 16, 48), (64, 16, 64)],
)
def test_padded_size_is_a_multiple_with_a_2x2_bottleneck_floor(size: int, multiple: int, expected: int) -> None:
    assert padded_size(size, multiple) == expected


@pytest.mark.parametrize(("channels", "groups"), [(4, 4), (8, 8), (12, 6), (64, 8), (5, 5), (7, 7)])
def test_group_count_divides_channels(channels: int, groups: int) -> None:
    assert group_count(channels) == groups


@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (33, 63), (17, 250)])
def test_padding_crops_back_to_the_input(h: int, w: int) -> None:
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    padded, (top, left, hh, ww) = pad_to_multiple(x, 8)
    assert padded.shape[-2] % 8 == 0 and padded.shape[-1] % 8 == 0
    assert torch.equal(padded[..., top : top + hh, left : left + ww], x)


@pytest.mark.parametrize(("h", "w"), [(33, 63), (1, 1), (17, 250), (64, 64)])
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 1), (3, 4), (5, 2)])
def test_output_has_input_size_and_one_channel_per_class(h: int, w: int, in_channels: int, num_classes: int) -> None:
    model = UNet(tiny(in_channels=in_channels, num_classes=num_classes))
    out = model(torch.randn(2, in_channels, h, w))
    assert out.shape == (2, num_classes, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_every_norm_and_upsample_trains_on_odd_and_tiny_inputs(norm: str, upsample: str) -> None:
    torch.manual_seed(0)
    model = UNet(tiny(norm=norm, upsample=upsample, dropout=0.2, num_classes=3)).train()
    assert model(torch.randn(1, 1, 1, 1)).shape == (1, 3, 1, 1)
    out = model(torch.randn(1, 1, 33, 63))
    assert out.shape == (1, 3, 33, 63)
    (out * torch.randn_like(out)).sum().backward()  # a random objective: a plain sum is norm-invariant
    first_conv = model.stem[0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def test_depth_and_base_channels_set_the_widths() -> None:
    model = UNet(tiny(depth=3, base_channels=8))
    assert len(model.downs) == len(model.ups) == 3
    assert model.downs[-1][1][0].out_channels == 8 * 2**3
    assert model.head.in_channels == 8


def test_eval_mode_is_deterministic_even_with_dropout() -> None:
    model = build_model(tiny(dropout=0.5, num_classes=2)).eval()
    x = torch.randn(1, 1, 21, 19)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_wrong_input_channels_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        UNet(tiny(in_channels=3))(torch.randn(1, 1, 8, 8))


def test_save_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    config = tiny(in_channels=2, num_classes=3, norm="group", upsample="bilinear")
    model = build_model(config).eval()
    out_dir = save_model(tmp_path / "m", model, extra={"normalization": {"mode": "zscore"}})
    loaded, saved = load_model(out_dir)
    assert not loaded.training
    assert loaded.config == config
    assert saved == {"model": config.model_dump(), "normalization": {"mode": "zscore"}}
    x = torch.randn(1, 2, 30, 17)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in out_dir.iterdir()) == ["config.json", "weights.pt"]  # no temp files left


class _WritesMarker:
    """Unpickling this calls ``Path.touch(marker)``: the classic code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    model_dir = save_model(tmp_path / "m", build_model(tiny()))
    marker = tmp_path / "pwned"
    torch.save({"stem.0.weight": _WritesMarker(marker)}, model_dir / "weights.pt")
    with pytest.raises(InputError, match="refused"):
        load_model(model_dir)
    assert not marker.exists()


def test_missing_config_is_an_input_error(tmp_path: Path) -> None:
    model_dir = save_model(tmp_path / "m", build_model(tiny()))
    (model_dir / "config.json").unlink()
    with pytest.raises(InputError, match="config.json: missing"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model": {"depth": 99}})), "model.depth"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model": tiny(depth=3).model_dump()})), "do not match"),
        (lambda d: (d / "weights.pt").unlink(), "weights.pt: missing"),
        (lambda d: (d / "weights.pt").write_bytes(b"garbage"), "not a torch weights file"),
    ],
    ids=["corrupt-json", "invalid-config", "config-weights-mismatch", "no-weights", "garbage-weights"],
)
def test_broken_model_folders_are_input_errors(tmp_path: Path, break_it, message: str) -> None:
    model_dir = save_model(tmp_path / "m", build_model(tiny()))
    break_it(model_dir)
    with pytest.raises(InputError, match=message) as info:
        load_model(model_dir)
    assert "\n" not in str(info.value)


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="model folder not found"):
        load_model(tmp_path / "nowhere")


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_folded_batch_norm_predicts_the_same_and_leaves_the_model_alone(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(base_channels=8, depth=3, num_classes=2, norm=norm))
    for m in model.modules():  # trained-looking statistics, so folding has something to get wrong
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.train()
    folded = fold_batch_norm(model)
    x = torch.rand(2, 1, 67, 45)
    with torch.inference_mode():
        expected = model.eval()(x)
        got = folded(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    norms = 2 * 7  # two per double conv: the input one, 3 down and 3 up
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules()) == 0  # all folded (or none there)
    assert sum(isinstance(m, torch.nn.InstanceNorm2d) for m in folded.modules()) == (0 if norm == "batch" else norms)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == (norms if norm == "batch" else 0)


# --- the 2-D model is unchanged by the N-D generalisation ---------------------------------------------------


def test_2d_model_keys_initialisation_and_outputs_are_as_before() -> None:
    # Reference numbers computed with the 2-D-only UNet (before spatial_dims existed), same seed and input:
    # a change of layer order, of the state_dict keys or of the forward shows up here.
    torch.manual_seed(0)
    model = UNet(tiny(num_classes=2)).eval()
    x = torch.rand(1, 1, 13, 10, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
    keys = list(model.state_dict())
    assert len(keys) == 66 and keys[:2] == ["stem.0.weight", "stem.1.weight"]
    assert keys[-4:] == ["ups.1.conv.4.running_var", "ups.1.conv.4.num_batches_tracked", "head.weight", "head.bias"]
    assert model.state_dict()["head.weight"].shape == (2, 4, 1, 1)
    assert y.double().sum().item() == pytest.approx(-92.72421729564667, rel=1e-5)
    assert y[0, 1, 6, 4].item() == pytest.approx(-0.40570545196533203, rel=1e-5)


def test_config_json_without_the_new_fields_loads_as_a_2d_model(tmp_path: Path) -> None:
    model = build_model(tiny(num_classes=2)).eval()
    out_dir = save_model(tmp_path / "m", model)
    saved = json.loads((out_dir / "config.json").read_text())
    assert saved["model"]["spatial_dims"] == 2 and saved["model"]["pool"] is None
    for field in ("spatial_dims", "pool", "kernels"):  # what a model saved before volumes holds
        del saved["model"][field]
    (out_dir / "config.json").write_text(json.dumps(saved))
    loaded, config = load_model(out_dir)
    assert loaded.config.spatial_dims == 2 and "spatial_dims" not in config["model"]
    x = torch.randn(1, 1, 20, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# --- 3-D UNets ---------------------------------------------------------------------------------------------


def tiny3d(**overrides: object) -> ModelConfig:
    return tiny(spatial_dims=3, **overrides)


@pytest.mark.parametrize(("d", "h", "w"), [(1, 1, 1), (5, 9, 7), (12, 17, 3)])
@pytest.mark.parametrize("pool", [None, [[1, 2, 2], [2, 2, 2]], [[1, 2, 2], [1, 2, 2]]])
def test_3d_output_has_input_size_for_odd_sizes_and_anisotropic_pooling(
    d: int, h: int, w: int, pool: list[list[int]] | None
) -> None:
    model = UNet(tiny3d(in_channels=2, num_classes=3, pool=pool)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, d, h, w))
    assert out.shape == (2, 3, d, h, w) and torch.isfinite(out).all()


def test_anisotropic_pooling_and_kernels_shape_the_layers() -> None:
    pool, kernels = [[1, 2, 2], [2, 2, 2]], [[1, 3, 3], [1, 3, 3], [3, 3, 3]]
    model = UNet(tiny3d(pool=pool, kernels=kernels))
    assert model.multiple == (2, 4, 4)
    assert model.stem[0].weight.shape == (4, 1, 1, 3, 3) and model.stem[0].padding == (0, 1, 1)
    assert model.downs[0][0].kernel_size == (1, 2, 2) and model.downs[1][1][0].weight.shape[2:] == (3, 3, 3)
    assert model.ups[1].up.stride == (1, 2, 2)  # the decoder undoes the first stage's pooling last
    assert model.ups[1].conv[0].weight.shape[2:] == (1, 3, 3)
    assert model.head.weight.shape == (1, 4, 1, 1, 1)


def test_1x3x3_kernels_keep_slices_apart() -> None:
    # With kernels 1 along z and no pooling along z, each slice's output depends on that slice only.
    model = UNet(tiny3d(pool=[[1, 2, 2], [1, 2, 2]], kernels=[[1, 3, 3]] * 3)).eval()  # eval batch norm: per voxel
    x = torch.randn(1, 1, 4, 16, 16)
    changed = x.clone()
    changed[:, :, 2] += 1.0
    with torch.no_grad():
        diff = (model(x) - model(changed)).abs().amax(dim=(0, 1, 3, 4))
    assert diff[2] > 0 and (diff[[0, 1, 3]] == 0).all()


@pytest.mark.parametrize("norm", ["batch", "instance", "group"])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_every_3d_norm_and_upsample_trains_on_odd_inputs(norm: str, upsample: str) -> None:
    torch.manual_seed(0)
    model = UNet(tiny3d(norm=norm, upsample=upsample, dropout=0.2, num_classes=2, pool=[[1, 2, 2], [2, 2, 2]])).train()
    out = model(torch.randn(1, 1, 5, 11, 9))
    assert out.shape == (1, 2, 5, 11, 9)
    (out * torch.randn_like(out)).sum().backward()
    grad = model.stem[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_wrong_input_axes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        UNet(tiny3d())(torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        UNet(tiny())(torch.randn(1, 1, 4, 8, 8))


def test_3d_save_load_round_trip(tmp_path: Path) -> None:
    config = tiny3d(num_classes=2, norm="instance", pool=[[1, 2, 2], [2, 2, 2]], kernels=[[1, 3, 3], [3, 3, 3],
                                                                                            [3, 3, 3]])
    model = build_model(config).eval()
    loaded, saved = load_model(save_model(tmp_path / "m", model))
    assert loaded.config == config
    assert saved["model"]["spatial_dims"] == 3 and saved["model"]["pool"] == [[1, 2, 2], [2, 2, 2]]
    x = torch.randn(1, 1, 6, 10, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pool": [[2, 2, 2]]}, "pool needs 2 lists of 3 values"),
        ({"pool": [[2, 2], [2, 2]]}, "pool needs 2 lists of 3 values"),
        ({"pool": [[3, 2, 2], [2, 2, 2]]}, "pool values must be 1 or 2"),
        ({"kernels": [[3, 3, 3]] * 2}, "kernels needs 3 lists of 3 values"),
        ({"kernels": [[2, 3, 3]] * 3}, "kernels values must be 1, 3, 5 or 7"),
        ({"spatial_dims": 4}, "spatial_dims"),
    ],
)
def test_bad_per_axis_stages_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"depth": 2, "spatial_dims": 3, **overrides})


def test_folded_batch_norm_3d_predicts_the_same() -> None:
    torch.manual_seed(0)
    model = build_model(tiny3d(num_classes=2, pool=[[1, 2, 2], [2, 2, 2]]))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded = fold_batch_norm(model)
    x = torch.rand(2, 1, 7, 13, 11)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in folded.modules()) == 0
    assert sum(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules()) == 2 * 5


@pytest.mark.parametrize(("shape", "multiple"), [((1, 1, 1), (1, 4, 4)), ((5, 9, 7), (2, 4, 4)), ((3, 30, 2), 4)])
def test_padding_per_axis_crops_back_to_the_input(shape: tuple[int, int, int], multiple: object) -> None:
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(1, 1, *shape)
    padded, box = pad_to_multiple(x, multiple)
    multiples = (multiple,) * 3 if isinstance(multiple, int) else multiple
    for n, m, p in zip(shape, multiples, padded.shape[2:]):
        assert p == padded_size(n, m) and p % m == 0
    assert len(box) == 6 and box[3:] == shape
    assert torch.equal(crop(padded, box), x)


# --- pooling planned from the spacing (nnU-Net's rule) --------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "patch", "depth", "pool", "kernels"),
    [
        # isotropic: 2 and 3 everywhere, the default UNet
        ((1.0, 1.0), (256, 256), 4, [[2, 2]] * 4, [[3, 3]] * 5),
        ((0.8, 0.8, 0.8), (64, 64, 64), 3, [[2, 2, 2]] * 3, [[3, 3, 3]] * 4),
        # CT 5 x 0.8 x 0.8 mm: in-plane spacing 0.8 -> 1.6 -> 3.2; z (5 / 3.2 = 1.56 < 2) joins at the third stage,
        # and its kernel is 1 until then (5 / 0.8 and 5 / 1.6 are >= 2)
        ((5.0, 0.8, 0.8), (32, 128, 128), 4, [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
         [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # ratio exactly 2 is not pooled (nnU-Net pools while spacing / finest < 2): z waits one stage
        ((2.0, 1.0, 1.0), (32, 64, 64), 3, [[1, 2, 2], [2, 2, 2], [2, 2, 2]],
         [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]),
        # a thin patch stops pooling z when its feature map would drop under 4 (z: 16 -> 8 -> 4, then stride 1)
        ((1.0, 1.0, 1.0), (16, 64, 64), 4, [[2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 5),
        # a coarse x axis in 2-D (3 / 1 = 3, then 3 / 2 = 1.5)
        ((1.0, 3.0), (128, 128), 3, [[2, 1], [2, 2], [2, 2]], [[3, 1], [3, 3], [3, 3], [3, 3]]),
    ],
)
def test_plan_pooling_table(spacing: tuple[float, ...], patch: tuple[int, ...], depth: int,
                            pool: list[list[int]], kernels: list[list[int]]) -> None:
    plan = plan_pooling(spacing, patch, depth)
    assert plan.pool == pool and plan.kernels == kernels
    config = ModelConfig(depth=depth, spatial_dims=len(spacing), pool=plan.pool, kernels=plan.kernels, base_channels=4)
    assert size_multiple(config) == plan.multiple


def test_plan_pooling_refuses_a_patch_too_small_for_the_depth() -> None:
    with pytest.raises(ValueError, match="too small for 3 stages"):
        plan_pooling((1.0, 1.0, 1.0), (8, 8, 8), 3)  # 8 -> 4, then nothing can pool
    with pytest.raises(ValueError, match="same 2 or 3 axes"):
        plan_pooling((1.0, 1.0), (8, 8, 8), 1)


def test_planned_3d_unet_runs_on_its_patch() -> None:
    plan = plan_pooling((4.0, 1.0, 1.0), (8, 32, 32), 3)
    model = UNet(tiny3d(depth=3, pool=plan.pool, kernels=plan.kernels)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 8, 32, 32)).shape == (1, 1, 8, 32, 32)


@pytest.mark.parametrize("dims", [2, 3])
def test_deep_supervision_adds_coarser_heads_and_leaves_the_prediction_alone(dims: int, tmp_path: Path) -> None:
    """Depth 4: heads at 1/2 and 1/4 (the 1/8 stage has none, as nnU-Net weighs it 0). The first training output
    is the prediction itself; the main path ignores the extra heads, so a model without them, given the same
    other weights, predicts the same; the weights round-trip with the heads."""
    torch.manual_seed(0)
    deep = build_model(tiny(depth=4, deep_supervision=True, spatial_dims=dims)).eval()
    size = (32,) * dims
    x = torch.randn(2, 1, *size)
    outputs = deep.forward_deep(x)
    assert [tuple(o.shape[2:]) for o in outputs] == [size, (16,) * dims, (8,) * dims]
    with torch.no_grad():
        assert torch.equal(outputs[0], deep(x))
        plain = build_model(tiny(depth=4, spatial_dims=dims)).eval()
        missing = plain.load_state_dict(deep.state_dict(), strict=False)
        assert missing.missing_keys == [] and all(k.startswith("aux_heads.") for k in missing.unexpected_keys)
        assert len(missing.unexpected_keys) == 4  # two heads, a weight and a bias each
        assert torch.equal(plain(x), deep(x))
    save_model(tmp_path / "m", deep)
    loaded, _ = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), deep(x))
    # an odd input is padded: the coarse outputs are cropped to ceil(size / stride)
    odd = deep.forward_deep(torch.randn(1, 1, *(33,) * dims))
    assert [tuple(o.shape[2:]) for o in odd] == [(33,) * dims, (17,) * dims, (9,) * dims]
    assert build_model(tiny(depth=2, deep_supervision=True)).aux_heads is not None
    assert len(build_model(tiny(depth=2, deep_supervision=True)).aux_heads) == 0  # no stage between
