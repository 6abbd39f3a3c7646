"""UNet shapes for any image size, gradients, determinism, and weights-only save/load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unetcore.config import ModelConfig
from unetcore.errors import InputError
from unetcore.model import UNet, build_model, load_model, save_model
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
