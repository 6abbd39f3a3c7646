"""Pure parts of distributed inference: block shapes, skipped tiles, components across blocks, cluster sizing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import measure

from unetcore.cluster import local_cluster_shape, probe_scheduler
from unetcore.errors import ServiceError
from unetcore.inference import (
    BACKGROUND_LOGIT,
    TileGrid,
    background_logits,
    choose_block_shape,
    constant_tiles,
    instances_blockwise,
    plan_blocks,
    postprocess_blockwise,
    postprocess_whole,
    predict_blocks_numpy,
    skip_empty_predictor,
    sliding_window,
    tile_evaluations,
    tiles_for_block,
)

# --- redundant tiles at block borders ------------------------------------------------------------------


def brute_force_evaluations(grid: TileGrid, block: tuple[int, int]) -> int:
    return sum(len(tiles_for_block(grid, b)) for b in plan_blocks(grid.shape, block))


@pytest.mark.parametrize(
    ("shape", "block", "expected"),
    [
        # 2048², tile 256, step 128: 15 x 15 grid starts; a 1024 band sees 8 starts (2 x 8 = 16 per axis).
        ((2048, 2048), (2048, 2048), 225),
        ((2048, 2048), (1024, 1024), 256),
        ((2048, 2048), (1024, 2048), 240),
        ((2048, 2048), (512, 512), 18 * 18),
    ],
)
def test_tile_evaluations_table(shape: tuple[int, int], block: tuple[int, int], expected: int) -> None:
    grid = TileGrid.build(shape, (256, 256), 0.5)
    assert grid.n_tiles == 225
    assert tile_evaluations(grid, block) == expected == brute_force_evaluations(grid, block)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 900), w=st.integers(1, 900), by=st.integers(16, 400), bx=st.integers(16, 400),
       tile=st.integers(8, 300), overlap=st.sampled_from([0.0, 0.25, 0.5]))
def test_tile_evaluations_equals_brute_force(h: int, w: int, by: int, bx: int, tile: int, overlap: float) -> None:
    grid = TileGrid.build((h, w), (tile, tile), overlap)
    assert tile_evaluations(grid, (by, bx)) == brute_force_evaluations(grid, (by, bx))


def test_block_shape_prefers_full_rows_when_two_workers_need_two_blocks() -> None:
    grid = TileGrid.build((2048, 2048), (256, 256), 0.5)
    # 1 block (225 tiles) would idle a worker; 1024 x 2048 bands (240) beat 1024² squares (256).
    assert choose_block_shape(grid, (1024, 1024), 2048**2, min_blocks=2) == (1024, 2048)
    assert choose_block_shape(grid, (1024, 1024), 2048**2, min_blocks=1) == (2048, 2048)


def test_block_shape_respects_pixel_cap_and_chunks() -> None:
    grid = TileGrid.build((10_000, 9_000), (256, 256), 0.5)
    bh, bw = choose_block_shape(grid, (512, 512), 2048**2, min_blocks=2)
    assert bh % 512 == 0 and bw % 512 == 0 and bh * bw <= 2048**2
    best = min(tile_evaluations(grid, (y, x)) for y in range(512, 10_240 + 1, 512) for x in range(512, 9_216 + 1, 512)
               if y * x <= 2048**2)
    assert tile_evaluations(grid, (bh, bw)) == best


def test_block_shape_single_chunk_allowed_whatever_the_cap() -> None:
    grid = TileGrid.build((300, 300), (64, 64), 0.5)
    assert choose_block_shape(grid, (128, 128), 100, min_blocks=64) == (128, 128)


# --- skipping constant tiles -------------------------------------------------------------------------


def test_constant_tiles_per_channel() -> None:
    batch = np.zeros((3, 2, 4, 4), np.float32)
    batch[0, 1] = 7.0  # constant in each channel: empty
    batch[1, 0, 2, 2] = 1.0  # one pixel differs: has signal
    batch[2, 1] = np.arange(16).reshape(4, 4)
    np.testing.assert_array_equal(constant_tiles(batch), [True, False, False])


@pytest.mark.parametrize(("classes", "expected"), [(1, [-BACKGROUND_LOGIT]), (3, [BACKGROUND_LOGIT, -BACKGROUND_LOGIT,
                                                                                    -BACKGROUND_LOGIT])])
def test_background_logits(classes: int, expected: list[float]) -> None:
    out = background_logits(classes, (2, 3))
    assert out.shape == (classes, 2, 3)
    np.testing.assert_array_equal(out[:, 0, 0], expected)


def test_skip_empty_never_runs_model_on_constant_tiles_and_gives_background() -> None:
    seen: list[np.ndarray] = []

    def foreground_everywhere(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.full((batch.shape[0], 1, *batch.shape[2:]), 5.0, np.float32)

    image = np.zeros((1, 96, 200), np.float32)
    image[:, :, 150:] = np.random.default_rng(0).random((1, 96, 50))
    predictor = skip_empty_predictor(foreground_everywhere, num_classes=1)
    out = sliding_window(image, predictor, (32, 32), 0.5, batch_size=4)
    assert seen and all(not constant_tiles(b).any() for b in seen)
    n_run = sum(len(b) for b in seen)
    grid = TileGrid.build((96, 200), (32, 32), 0.5)
    assert n_run == sum(1 for _, x in grid.tiles() if x + 32 > 150)  # only tiles reaching the signal ran
    np.testing.assert_allclose(out[:, :, :118], -BACKGROUND_LOGIT, atol=1e-5)  # only skipped tiles here
    np.testing.assert_allclose(out[:, :, 150:], 5.0, atol=1e-5)
    np.testing.assert_array_equal(predict_blocks_numpy(image, predictor, (32, 32), 0.5, (40, 56), 4), out)


# --- connected components across blocks --------------------------------------------------------------


def test_u_shaped_object_crossing_three_blocks_gets_one_id() -> None:
    sem = np.zeros((12, 12), np.uint8)
    sem[1:11, 1] = 1  # left arm (block column 0)
    sem[10, 1:11] = 1  # bottom bar crosses into block column 1 and 2
    sem[1:11, 10] = 1  # right arm (block column 2)
    sem[2, 5] = 1  # a separate dot
    inst = instances_blockwise(sem, (4, 4))
    assert len(np.unique(inst[sem == 1])) == 2 and (inst[sem == 0] == 0).all()
    assert len({int(inst[1, 1]), int(inst[1, 10]), int(inst[10, 6])}) == 1
    assert inst[2, 5] != inst[1, 1] and inst.max() == 2


def test_touching_objects_of_different_classes_stay_apart() -> None:
    sem = np.zeros((4, 8), np.uint8)
    sem[:, :4] = 1
    sem[:, 4:] = 2  # different class across the block border at x = 4
    inst = instances_blockwise(sem, (4, 4))
    assert inst[0, 0] != inst[0, 7] and inst.max() == 2


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), by=st.integers(1, 25), bx=st.integers(1, 25),
       p=st.floats(0.2, 0.8), seed=st.integers(0, 10_000))
def test_blockwise_instances_partition_equals_whole_image_labelling(
    h: int, w: int, by: int, bx: int, p: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    sem = ((rng.random((h, w)) < p) * rng.integers(1, 3, (h, w))).astype(np.uint8)
    inst = instances_blockwise(sem, (by, bx))
    ref = measure.label(sem, background=0, connectivity=1)
    assert inst.max() == ref.max()
    assert ((inst > 0) == (ref > 0)).all()
    assert len(set(zip(inst.ravel().tolist(), ref.ravel().tolist()))) == len(np.unique(ref))  # a bijection of ids


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), by=st.integers(1, 25), bx=st.integers(1, 25),
       m=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_blockwise_postprocessing_equals_whole_image(h: int, w: int, by: int, bx: int, m: int, seed: int) -> None:
    sem = (np.random.default_rng(seed).random((h, w)) < 0.5).astype(np.uint8)
    np.testing.assert_array_equal(postprocess_blockwise(sem, (by, bx), m), postprocess_whole(sem, m))


def test_postprocessing_table() -> None:
    sem = np.zeros((7, 9), np.uint8)
    sem[1:6, 1:6] = 1
    sem[3, 3] = 0  # a 1-pixel hole: filled
    sem[0, 8] = 1  # a 1-pixel object: removed
    sem[6, 0] = 0  # background on the image border is never a hole
    out = postprocess_blockwise(sem, (3, 4), 2)
    expected = sem.copy()
    expected[3, 3] = 1
    expected[0, 8] = 0
    np.testing.assert_array_equal(out, expected)


# --- cluster sizing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cores", "gpus", "workers", "threads", "expected"),
    [(2, 0, 0, 0, (2, 1)), (16, 0, 0, 0, (16, 1)), (16, 2, 0, 0, (2, 8)), (2, 0, 1, 0, (1, 2)), (8, 0, 2, 3, (2, 3))],
)
def test_local_cluster_shape(cores: int, gpus: int, workers: int, threads: int, expected: tuple[int, int]) -> None:
    assert local_cluster_shape(cores, gpus, workers, threads) == expected


def test_unreachable_scheduler_fails_fast() -> None:
    start = time.perf_counter()
    with pytest.raises(ServiceError, match="tcp://127.0.0.1:1: Dask scheduler unreachable"):
        probe_scheduler("tcp://127.0.0.1:1")
    assert time.perf_counter() - start < 3.0


# --- malloc settings of the processes that run the model ---------------------------------------------

MMAPPED_PROBE = """
import ctypes, sys, threading
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def mmapped(n):  # bytes glibc maps for a malloc(n) while it is held
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(n)
    during = libc.mallinfo2().hblkhd
    libc.free(p)
    return during - before
from unetcore.allocator import FORWARD_MMAP_BYTES, heap_buffers, release_free_memory, tune_for_blocks
activation, chunk = 4 << 20, 1 << 20
untuned, untuned_chunk = mmapped(activation), mmapped(chunk)
print(tune_for_blocks())
outside, outside_chunk = mmapped(activation), mmapped(chunk)
with heap_buffers():
    inside, large = mmapped(activation), mmapped(2 * FORWARD_MMAP_BYTES)
release_free_memory()  # the heap kept what the pass freed (a later request may reuse it); give it back
held = []
thread = threading.Thread(target=lambda: held.append(libc.malloc(1 << 16)))
thread.start()
thread.join()
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
main_heap = held[0] < libc.sbrk(0)  # the main heap lies below the program break; a thread's own is mapped elsewhere
after = mmapped(activation)
print(tune_for_blocks(3))  # a volume's block: its chunk buffers mapped again, also after a forward pass
with heap_buffers():
    volume_inside = mmapped(activation)
release_free_memory()
volume_chunk = mmapped(chunk)
print(untuned, outside, inside, large, after, untuned_chunk, outside_chunk, int(main_heap), volume_inside,
      volume_chunk)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_malloc_settings_keep_small_buffers_and_activations_on_one_heap_per_block_dimension() -> None:
    # As in a Dask worker: the nanny's MALLOC_TRIM_THRESHOLD_ pins glibc's mmap threshold at 128 KiB.
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MMAPPED_PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    applied, applied_volume, numbers = out.stdout.splitlines()
    untuned, outside, inside, large, after, untuned_chunk, outside_chunk, same_heap, volume_inside, volume_chunk = (
        int(v) for v in numbers.split())
    assert applied == applied_volume == "True"
    mib4 = 4 << 20
    assert untuned >= mib4  # a 4 MiB activation was mmapped, and unmapped when freed: page faults again
    assert outside >= mib4  # block-sized arrays outside a forward pass stay mapped: they do not fragment the heap
    assert inside == 0  # ... but inside one it comes from the heap, reused by the next pass
    assert large >= 2 * (32 << 20)  # very large requests are still mapped
    assert after >= mib4  # the setting ends with the pass
    assert untuned_chunk >= 1 << 20  # a chunk's 1 MiB buffer was mapped at Dask's setting ...
    assert outside_chunk == 0  # ... and comes from the heap once tuned, reused within a block
    assert same_heap == 1  # a new thread allocates from the main heap, not from one of its own
    assert volume_inside == 0  # a volume's forward pass takes its activations from the heap too ...
    assert volume_chunk >= 1 << 20  # ... but its 1 MiB buffers are mapped outside one (memory flat, BENCHMARKS.md)


def test_exported_label_png_keeps_the_class_ids_and_shows_colours(tmp_path) -> None:
    """A 0/1 mask looks black in a viewer unless it carries a palette: ids stay, colours come with them."""
    from PIL import Image

    from unetcore.inference.outputs import LABEL_COLOURS, label_png
    from unetcore.io import open_image, open_mask

    labels = np.zeros((20, 30), np.uint8)
    labels[5:10, 5:10] = 1
    labels[12:15, 20:25] = 2
    label_png(labels).save(tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), labels)
    rgb = np.asarray(back.convert("RGB"))
    assert tuple(rgb[7, 7]) == LABEL_COLOURS[1] == (255, 255, 255) and tuple(rgb[0, 0]) == (0, 0, 0)
    assert tuple(rgb[13, 22]) == LABEL_COLOURS[2]
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "img.png")
    mask = open_mask(tmp_path / "m.png", open_image(tmp_path / "img.png"), num_classes=3)
    np.testing.assert_array_equal(mask.read(slice(0, 20), slice(0, 30))[..., 0], labels)  # re-ingestable as a mask
