"""Rewrite the shipped float16 cast graph (``unetcore/inference/graphs/cast-float16.onnx``) from
:func:`unetcore.inference.float16.build_graph`; ``tests/test_float16.py`` checks the shipped file is its graph.

Usage: ``.venv/bin/python scripts/make_cast_graph.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unetcore.inference.float16 import GRAPH, build_graph  # noqa: E402


def main() -> None:
    GRAPH.parent.mkdir(exist_ok=True)
    GRAPH.write_bytes(build_graph().SerializeToString())
    print(GRAPH, GRAPH.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
