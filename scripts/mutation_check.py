"""Mutation check: break a core function on purpose and require the tests that guard it to fail.

Each mutant is one source edit of the real function (the original text must occur exactly once, so a mutant that
no longer applies after a refactoring is an error, never a silent pass). The edit is made in a temporary copy of
the repository (tracked and untracked-but-not-ignored files), pytest runs the mutant's tests there with ``-x``, and
the mutant is *killed* when pytest reports failing tests (exit 1). The unmutated copy must pass the same tests
first. Prints a table and the kill rate; exits 1 if any mutant survives, 2 on an error.

    .venv/bin/python scripts/mutation_check.py                               # every mutant, with the oracles
    .venv/bin/python scripts/mutation_check.py --without tests/test_oracles.py  # what the rest of the suite kills

Not part of the default test run (about a minute per pass on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

BLENDING = ["tests/test_oracles.py", "tests/test_windows.py", "tests/test_stitch.py", "tests/test_infer_units.py"]


@dataclass(frozen=True)
class Mutant:
    """Replace ``old`` (exactly one occurrence) by ``new`` in ``path``; ``tests`` are pytest arguments."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("gaussian weights all ones", "unetcore/inference/windows.py",
           "w = (w / w.max()).astype(dtype)", "w = np.ones_like(w).astype(dtype)", tuple(BLENDING)),
    Mutant("tile starts off by one (last tile one short)", "unetcore/inference/windows.py",
           "np.linspace(0, size - tile, n)", "np.linspace(0, size - tile - 1, n)", tuple(BLENDING)),
    Mutant("tile starts off by one (last tile one past)", "unetcore/inference/windows.py",
           "np.linspace(0, size - tile, n)", "np.linspace(0, size - tile + 1, n)", tuple(BLENDING)),
    Mutant("percentiles ignored (min-max scaling)", "unetcore/store/stats.py",
           "lo = percentile(ch, recipe.low_percentile)\n"
           "            spread = percentile(ch, recipe.high_percentile) - lo",
           'lo = ch["min"]\n            spread = ch["max"] - lo',
           ("tests/test_oracles.py", "tests/test_store.py")),
    Mutant("mask not transformed by the affine step", "unetcore/training/augment.py",
           'mask = ndimage.affine_transform(mask, matrix, offset, order=0, mode="reflect")', "mask = mask",
           ("tests/test_oracles.py", "tests/test_training.py::test_augmentation_keeps_mask_values_exact",
            "tests/test_training.py::test_flip_only_augmentation_moves_image_and_mask_together")),
    Mutant("binary threshold inverted", "unetcore/inference/predict.py",
           "labels = (probs[0] > threshold)", "labels = (probs[0] < threshold)",
           ("tests/test_oracles.py", "tests/test_engine.py::test_engine_equals_whole_image_sliding_window")),
    Mutant("block faces not merged", "unetcore/inference/components.py",
           "        if same.any():\n            edges.append(", "        if False:\n            edges.append(",
           ("tests/test_oracles.py", "tests/test_infer_units.py")),
]


def copy_repository(dst: Path) -> None:
    """Copy tracked and untracked-but-not-ignored files (what a commit of the working tree would hold)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_pytest(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Run pytest in ``root`` (stop at the first failure); return its exit code and the first failing test."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=root, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    failed = [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]  # from -ra (pyproject's addopts)
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    return proc.returncode, f"{failed[0]} ({summary})" if failed else summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", action="append", default=[], metavar="TEST_FILE",
                        help="leave this test file out of every mutant's tests (repeatable)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run mutants whose name has NAME")
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.only or any(s in m.name for s in args.only)]

    def selection(m: Mutant) -> tuple[str, ...]:
        return tuple(t for t in m.tests if t.split("::")[0] not in args.without)

    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        root = Path(tmp)
        copy_repository(root)
        everything = tuple(dict.fromkeys(t for m in mutants for t in selection(m)))
        code, last = run_pytest(root, everything)
        if code != 0:
            print(f"the unmutated code fails its own tests ({last}); fix that first", file=sys.stderr)
            return 2
        rows: list[tuple[str, str, str]] = []
        for m in mutants:
            target = root / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                rows.append((m.name, "ERROR", f"{m.path}: the text to mutate occurs {original.count(m.old)} times"))
                continue
            tests = selection(m)
            target.write_text(original.replace(m.old, m.new))
            start = time.monotonic()
            try:
                code, last = run_pytest(root, tests) if tests else (0, "no tests selected")
            finally:
                target.write_text(original)
            verdict = {0: "survived", 1: "killed"}.get(code, "ERROR")
            rows.append((m.name, verdict, f"{last} [{time.monotonic() - start:.0f} s]"))

    width = max(len(r[0]) for r in rows)
    print(f"{'mutant':<{width}}  verdict   first failing test (pytest summary) [time]")
    for name, verdict, detail in rows:
        print(f"{name:<{width}}  {verdict:<8}  {detail}")
    killed = sum(r[1] == "killed" for r in rows)
    without = f" (without {', '.join(args.without)})" if args.without else ""
    print(f"kill rate: {killed}/{len(rows)} = {killed / len(rows):.0%}{without}")
    if any(r[1] == "ERROR" for r in rows):
        return 2
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
