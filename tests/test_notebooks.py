"""Every notebook under notebooks/ runs top to bottom on the shipped checkpoint.

Code cells are executed in order in one namespace (what a kernel would do), with the
non-interactive matplotlib backend, so a notebook that breaks with the API fails CI.
"""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nb = json.loads(path.read_text())
    namespace = {"__name__": "__notebook__"}
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)
    plt.close("all")


def test_there_is_a_notebook():
    assert NOTEBOOKS
