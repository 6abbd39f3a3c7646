"""Rewrite the output step's shipped graphs (``unetcore/inference/graphs/*.onnx``) from
:func:`unetcore.inference.postops.build_graph`; ``tests/test_postops.py`` checks the shipped files are its graphs.

Usage: ``.venv/bin/python scripts/make_output_graphs.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unetcore.inference.postops import GRAPH_DIR, GRAPH_NAMES, build_graph, graph_file  # noqa: E402


def main() -> None:
    GRAPH_DIR.mkdir(exist_ok=True)
    for activation, stored in GRAPH_NAMES:
        path = graph_file(activation, stored)
        path.write_bytes(build_graph(activation, stored).SerializeToString())
        print(path)


if __name__ == "__main__":
    main()
