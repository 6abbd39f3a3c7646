"""The synthetic nuclei generator: determinism, shapes, realism knobs, and the files write_sample leaves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from unetcore.data.synthetic import generate_image, instances_to_semantic, write_sample
from unetcore.errors import ConfigError
from unetcore.io.readers import open_image, open_mask


@pytest.fixture(scope="module")
def sample_256() -> tuple[np.ndarray, np.ndarray]:
    return generate_image((256, 256), seed=7)


def test_same_seed_gives_same_arrays_and_other_seed_differs() -> None:
    a_img, a_inst = generate_image((96, 128), seed=3)
    b_img, b_inst = generate_image((96, 128), seed=3)
    c_img, _ = generate_image((96, 128), seed=4)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_inst, b_inst)
    assert not np.array_equal(a_img, c_img)


@pytest.mark.parametrize(("dtype", "channels", "shape"), [("uint8", 1, (65, 97)), ("uint16", 1, (64, 64)),
                                                          ("uint8", 3, (80, 48))])
def test_shapes_and_dtypes(dtype: str, channels: int, shape: tuple[int, int]) -> None:
    image, instances = generate_image(shape, seed=1, dtype=dtype, channels=channels)
    assert image.dtype == np.dtype(dtype)
    assert image.shape == (shape if channels == 1 else (*shape, channels))
    assert instances.shape == shape and instances.dtype == np.int32
    assert instances.min() == 0


def test_labels_are_consecutive_and_each_instance_is_one_piece(sample_256: tuple[np.ndarray, np.ndarray]) -> None:
    _, instances = sample_256
    labels = np.unique(instances)
    np.testing.assert_array_equal(labels, np.arange(labels.size))
    assert labels.size > 20
    pieces = [ndi.label(instances == k)[1] for k in labels[1:]]
    assert np.mean(np.array(pieces) == 1) > 0.95  # overlap splitting may rarely chip off a sliver


def test_some_instances_touch(sample_256: tuple[np.ndarray, np.ndarray]) -> None:
    _, instances = sample_256
    # a pixel of one instance 4-adjacent to a pixel of another instance: touching nuclei
    right = (instances[:, :-1] > 0) & (instances[:, 1:] > 0) & (instances[:, :-1] != instances[:, 1:])
    down = (instances[:-1] > 0) & (instances[1:] > 0) & (instances[:-1] != instances[1:])
    assert right.sum() + down.sum() > 10


def test_objects_vary_in_size_and_brightness(sample_256: tuple[np.ndarray, np.ndarray]) -> None:
    image, instances = sample_256
    index = np.arange(1, instances.max() + 1)
    areas = ndi.sum_labels(np.ones_like(instances), instances, index)
    means = ndi.mean(image.astype(float), instances, index)
    big = areas > 50  # ignore slivers cut by the border
    assert np.percentile(areas[big], 90) > 2 * np.percentile(areas[big], 10)
    assert np.percentile(means[big], 90) > 1.8 * np.percentile(means[big], 10)


def test_background_is_uneven(sample_256: tuple[np.ndarray, np.ndarray]) -> None:
    image, instances = sample_256
    background = ndi.binary_erosion(instances == 0, iterations=4)
    smooth = ndi.uniform_filter(np.where(background, image, 0).astype(float), 48)
    weight = ndi.uniform_filter(background.astype(float), 48)
    level = smooth[weight > 0.5] / weight[weight > 0.5]
    assert level.max() > 1.5 * level.min()


@pytest.mark.parametrize("mode", ["binary", "boundary"])
def test_instances_to_semantic(mode: str) -> None:
    instances = np.zeros((8, 10), np.int32)
    instances[1:5, 1:4] = 1
    instances[1:5, 4:8] = 2  # touches 1
    semantic = instances_to_semantic(instances, mode)
    assert semantic.dtype == np.uint8
    np.testing.assert_array_equal(semantic > 0, instances > 0)
    if mode == "binary":
        assert set(np.unique(semantic)) == {0, 1}
    else:
        boundary = find_boundaries(instances, mode="inner") & (instances > 0)
        np.testing.assert_array_equal(semantic == 2, boundary)
        assert semantic[2, 3] == 2 and semantic[2, 4] == 2  # the seam between the two is boundary
        assert semantic[2, 2] == 1


def test_instances_to_semantic_rejects_unknown_mode() -> None:
    with pytest.raises(ConfigError, match="binary"):
        instances_to_semantic(np.zeros((2, 2), np.int32), "edges")  # type: ignore[arg-type]


def test_write_sample_files_masks_and_tiled_tiff(tmp_path: Path) -> None:
    info = write_sample(tmp_path, n_images=2, size=64, large_size=512, seed=5)
    stems = ["sample_000", "sample_001", "large_000"]
    assert [p.stem for p in info.images] == stems and [p.stem for p in info.masks] == stems
    assert info.n_images == 3 and info.n_objects > 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        ["sample_000.png", "sample_001.png", "large_000.tif"]
    )  # no temporary files left behind
    for image_path, mask_path in zip(info.images, info.masks):
        mask = np.asarray(Image.open(mask_path))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert mask.any()

    assert info.large_image == tmp_path / "images" / "large_000.tif"
    with tifffile.TiffFile(info.large_image) as tif:
        page = tif.pages[0]
        assert page.is_tiled and (page.tilelength, page.tilewidth) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        whole = page.asarray()
    source = open_image(info.large_image)
    assert source.shape_yxc == (512, 512, 1)
    np.testing.assert_array_equal(source.read(slice(300, 340), slice(250, 270))[..., 0], whole[300:340, 250:270])
    mask = open_mask(info.masks[-1], source, num_classes=1)
    assert mask.shape_yxc == (512, 512, 1)


def test_write_sample_is_deterministic_and_skips_large(tmp_path: Path) -> None:
    a = write_sample(tmp_path / "a", n_images=1, size=48, large_size=0, seed=2, fmt="tif")
    b = write_sample(tmp_path / "b", n_images=1, size=48, large_size=0, seed=2, fmt="tif")
    assert a.large_image is None and [p.name for p in a.images] == ["sample_000.tif"]
    np.testing.assert_array_equal(tifffile.imread(a.images[0]), tifffile.imread(b.images[0]))
    assert a.masks[0].read_bytes() == b.masks[0].read_bytes()


def test_write_sample_mask_matches_generated_instances(tmp_path: Path) -> None:
    info = write_sample(tmp_path, n_images=1, size=40, large_size=0, seed=9)
    image = np.asarray(Image.open(info.images[0]))
    mask = np.asarray(Image.open(info.masks[0]))
    expected_image, instances = generate_image((40, 40), info.seeds[0])
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(mask, (instances > 0).astype(np.uint8))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"shape": (0, 5)}, "shape"), ({"density": 1.5}, "density"), ({"mean_radius": 1.0}, "mean_radius"),
     ({"dtype": "float32"}, "dtype"), ({"channels": 0}, "channels")],
)
def test_generate_image_rejects_bad_arguments(kwargs: dict, field: str) -> None:
    args = {"shape": (32, 32), "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=field):
        generate_image(**args)
