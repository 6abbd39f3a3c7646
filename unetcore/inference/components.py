"""Connected components of a label image, computed block by block and merged across block faces.

Each block is labelled on its own (face connectivity: 4 neighbours in 2-D, 6 in 3-D; one component per connected
region of equal value) with local ids ``1..n``. Only what lies on the block's faces (4 in 2-D, 6 in 3-D) is kept
for the merge: the driver joins the components that touch across a face (same value on both sides) with a
union-find, so an object that crosses block borders gets one id, and memory is bounded by the blocks' surfaces,
never by the image. The same
merge gives each component its whole-image size and whether it touches the image's border, which makes the
small-object and small-hole removal independent of where the block borders fall.

Global ids: block ``b`` (in plan order) owns ``base[b] + 1 .. base[b] + n_b``; a merged set is represented
by its smallest global id; final instance ids number the sets ``1..N`` in the order of their representatives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetcore.inference.windows import Block, Shape, plan_blocks

ALL_PIXELS = 255
"""Value never present in class labels (uint8, at most 255 classes: 0..254); used as skimage's background."""


@dataclass
class BlockComponents:
    """The components of one block: per-id attributes (index 0 unused) and the ids along the faces.

    ``sizes``/``classes``/``border`` have ``n + 1`` entries; ``border`` says the component touches the image's
    outer border. Faces hold local ids (0 = not labelled) and the class value on the block's first/last
    row (``top``/``bottom``), first/last column (``left``/``right``) and, in a volume, first/last slice
    (``front``/``back``); see :func:`face_names`.
    """

    n: int
    sizes: np.ndarray
    classes: np.ndarray
    border: np.ndarray
    faces: dict[str, np.ndarray]
    face_classes: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        """Write to ``path`` (``.npz``) through a temporary name, so a present file is whole."""
        tmp = path.with_name(f".{path.name}.tmp.npz")
        arrays = {f"face_{k}": v for k, v in self.faces.items()}
        arrays.update({f"class_{k}": v for k, v in self.face_classes.items()})
        np.savez(tmp, n=np.int64(self.n), sizes=self.sizes, classes=self.classes, border=self.border, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> BlockComponents:
        """Read what :meth:`save` wrote."""
        with np.load(path) as z:
            names = [k.removeprefix("face_") for k in z.files if k.startswith("face_")]
            faces = {k: z[f"face_{k}"] for k in names}
            face_classes = {k: z[f"class_{k}"] for k in names}
            return cls(int(z["n"]), z["sizes"], z["classes"], z["border"], faces, face_classes)


FACE_NAMES = (("front", "back"), ("top", "bottom"), ("left", "right"))
"""(low, high) face names of the z, y and x axes; an image uses the last two."""


def face_names(ndim: int) -> list[tuple[str, str]]:
    """The (low, high) face names of each spatial axis of a ``ndim``-D block, in axis order."""
    return list(FACE_NAMES[len(FACE_NAMES) - ndim :])


def _face_slices(ndim: int) -> dict[str, tuple[slice | int, ...]]:
    """Index of each face of a ``ndim``-D array: the first or last position along one axis."""
    out: dict[str, tuple[slice | int, ...]] = {}
    for axis, names in enumerate(face_names(ndim)):
        for name, end in zip(names, (0, -1)):
            out[name] = tuple(end if a == axis else slice(None) for a in range(ndim))
    return out


def label_block(
    semantic: np.ndarray, block: Block, image_shape: Shape, with_background: bool
) -> tuple[np.ndarray, BlockComponents]:
    """Local components (``block.shape``, uint32) of a block of class labels, and their summary.

    Args:
        semantic: class labels of the block, (bh, bw) or (bd, bh, bw), uint8.
        block: where the block lies in the image.
        image_shape: shape of the whole image (to flag components on its border).
        with_background: label background (class 0) regions too; otherwise they stay 0.
    """
    from skimage import measure

    ids, n = measure.label(semantic, background=ALL_PIXELS if with_background else 0, connectivity=1,
                           return_num=True)
    ids = ids.astype(np.uint32)
    sizes = np.bincount(ids.ravel(), minlength=n + 1).astype(np.int64)
    classes = np.zeros(n + 1, np.uint8)
    classes[ids.ravel()] = semantic.ravel()
    border = np.zeros(n + 1, bool)
    on_edge = {}
    for axis, (low, high) in enumerate(face_names(block.ndim)):
        on_edge[low], on_edge[high] = block.start[axis] == 0, block.stop[axis] == image_shape[axis]
    where = _face_slices(block.ndim)
    faces = {k: np.ascontiguousarray(ids[s]) for k, s in where.items()}
    for k, edge in on_edge.items():
        if edge:
            border[faces[k]] = True
    border[0] = False
    face_classes = {k: np.ascontiguousarray(semantic[s]) for k, s in where.items()}
    return ids, BlockComponents(n, sizes, classes, border, faces, face_classes)


@dataclass
class Merged:
    """Result of merging block components across faces.

    ``nodes`` (sorted global ids that touch a neighbouring block's component) map to ``reps`` (their set's
    smallest global id), ``set_sizes`` and ``set_border`` (the whole set's size and border flag).
    """

    base: np.ndarray
    nodes: np.ndarray
    reps: np.ndarray
    set_sizes: np.ndarray
    set_border: np.ndarray

    @property
    def total(self) -> int:
        """Number of local components over all blocks."""
        return int(self.base[-1])

    def _lookup(self, gids: np.ndarray, values: np.ndarray, default: np.ndarray) -> np.ndarray:
        """``values`` at the positions of ``gids`` in ``nodes``; ``default`` where a gid is not a node."""
        if len(self.nodes) == 0:
            return default
        pos = np.minimum(np.searchsorted(self.nodes, gids), len(self.nodes) - 1)
        return np.where(self.nodes[pos] == gids, values[pos], default)

    def instance_lut(self, index: int, comps: BlockComponents) -> np.ndarray:
        """Local id → final instance id (uint32, 0 → 0) of block ``index``; ids are compact ``1..N``."""
        gids = self.base[index] + np.arange(1, comps.n + 1, dtype=np.int64)
        reps = self._lookup(gids, self.reps, gids)
        non_reps = self.nodes[self.nodes != self.reps]  # sorted: nodes is
        lut = np.zeros(comps.n + 1, np.uint32)
        lut[1:] = reps - np.searchsorted(non_reps, reps)
        return lut

    def postprocess_lut(self, index: int, comps: BlockComponents, min_size: int) -> np.ndarray:
        """Local id → class after removing objects and filling holes smaller than ``min_size`` (whole-image sizes).

        Sizes count pixels, or voxels in a volume. A foreground component (class > 0) smaller than ``min_size``
        becomes background; a background component smaller than ``min_size`` that does not touch the image's
        border (a hole) becomes class 1. Both are decided
        on the components before either change.
        """
        gids = self.base[index] + np.arange(1, comps.n + 1, dtype=np.int64)
        sizes = self._lookup(gids, self.set_sizes, comps.sizes[1:])
        border = self._lookup(gids, self.set_border, comps.border[1:])
        classes = comps.classes[1:]
        out = classes.copy()
        out[(classes > 0) & (sizes < min_size)] = 0
        out[(classes == 0) & (sizes < min_size) & ~border] = 1
        return np.concatenate([[0], out]).astype(np.uint8)

    def n_instances(self) -> int:
        """Number of merged sets (instances when only foreground was labelled)."""
        return self.total - int(np.count_nonzero(self.nodes != self.reps))


def _neighbours(plan: Sequence[Block]) -> list[tuple[int, int, str, str]]:
    """Adjacent block pairs ``(a, b, face of a, face of b)``: b follows a along one axis (behind, below, right)."""
    at = {b.start: i for i, b in enumerate(plan)}
    pairs = []
    for i, b in enumerate(plan):
        for axis, (low, high) in enumerate(face_names(b.ndim)):
            after = b.start[:axis] + (b.stop[axis],) + b.start[axis + 1 :]
            if (j := at.get(after)) is not None:
                pairs.append((i, j, high, low))
    return pairs


def merge_faces(plan: Sequence[Block], load: Callable[[int], BlockComponents]) -> Merged:
    """Join components that touch across block faces (same class on both sides) into whole-image sets.

    ``plan`` is a regular block grid (:func:`~unetcore.inference.windows.plan_blocks`); ``load(i)`` returns the
    components of block ``i``. Each block is loaded twice (faces, then attributes of merged components), so the
    driver never holds more than the faces.
    """
    counts = np.zeros(len(plan) + 1, np.int64)
    faces: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []
    for i in range(len(plan)):
        c = load(i)
        counts[i + 1] = c.n
        faces.append((c.faces, c.face_classes))
    base = np.cumsum(counts)
    edges = []
    for a, b, fa, fb in _neighbours(plan):
        ida, idb = faces[a][0][fa], faces[b][0][fb]
        same = (ida > 0) & (idb > 0) & (faces[a][1][fa] == faces[b][1][fb])
        if same.any():
            edges.append(np.stack([ida[same] + base[a], idb[same] + base[b]], axis=1))
    del faces
    if not edges:
        empty = np.zeros(0, np.int64)
        return Merged(base, empty, empty, empty, np.zeros(0, bool))
    pairs = np.unique(np.concatenate(edges).astype(np.int64), axis=0)
    nodes, inv = np.unique(pairs, return_inverse=True)
    inv = inv.reshape(pairs.shape)
    from scipy.sparse import coo_matrix  # here: a prediction without components never imports scipy.sparse
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes)))
    n_sets, set_of = connected_components(graph, directed=False)
    set_rep = np.full(n_sets, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(set_rep, set_of, nodes)
    set_size = np.zeros(n_sets, np.int64)
    set_border = np.zeros(n_sets, bool)
    owner = np.searchsorted(base, nodes, side="left") - 1  # block of each node: base[b] < gid <= base[b + 1]
    for i in np.unique(owner):
        c = load(int(i))
        mine = owner == i
        local = nodes[mine] - base[i]
        np.add.at(set_size, set_of[mine], c.sizes[local])
        np.logical_or.at(set_border, set_of[mine], c.border[local])
    return Merged(base, nodes, set_rep[set_of], set_size[set_of], set_border[set_of])


def label_blockwise(
    semantic: np.ndarray, block: Shape, with_background: bool
) -> tuple[list[Block], list[np.ndarray], list[BlockComponents], Merged]:
    """Label an in-memory image or volume block by block and merge (the engine's algorithm without Dask or Zarr)."""
    plan = plan_blocks(semantic.shape, block)
    results = [label_block(semantic[b.slices], b, semantic.shape, with_background) for b in plan]
    merged = merge_faces(plan, lambda i: results[i][1])
    return plan, [r[0] for r in results], [r[1] for r in results], merged


def instances_blockwise(semantic: np.ndarray, block: Shape) -> np.ndarray:
    """Instance ids (uint32) of an in-memory image or volume, computed block-wise: equal to whole-image labelling."""
    plan, ids, comps, merged = label_blockwise(semantic, block, with_background=False)
    out = np.zeros(semantic.shape, np.uint32)
    for i, b in enumerate(plan):
        out[b.slices] = merged.instance_lut(i, comps[i])[ids[i]]
    return out


def postprocess_blockwise(semantic: np.ndarray, block: Shape, min_size: int) -> np.ndarray:
    """Small-object removal and hole filling of an in-memory image or volume, computed block-wise."""
    plan, ids, comps, merged = label_blockwise(semantic, block, with_background=True)
    out = np.zeros_like(semantic)
    for i, b in enumerate(plan):
        out[b.slices] = merged.postprocess_lut(i, comps[i], min_size)[ids[i]]
    return out


def postprocess_whole(semantic: np.ndarray, min_size: int) -> np.ndarray:
    """Reference for :func:`postprocess_blockwise` on the whole image at once (memory grows with the image)."""
    ids, comps = label_block(semantic, Block.covering(semantic.shape), semantic.shape, True)
    merged = Merged(np.array([0, comps.n]), *(np.zeros(0, np.int64),) * 3, np.zeros(0, bool))
    return merged.postprocess_lut(0, comps, min_size)[ids]
