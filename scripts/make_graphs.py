"""Rewrite the shipped element-wise graphs (``unetcore/graphs/*.onnx``) from
:func:`unetcore.elementwise.build_graph`; ``tests/test_elementwise.py`` checks the shipped files are its
graphs.

Usage: ``.venv/bin/python scripts/make_graphs.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unetcore.elementwise import GRAPHS, build_graph  # noqa: E402


def main() -> None:
    for step, path in GRAPHS.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(build_graph(step).SerializeToString())
        print(path, path.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
