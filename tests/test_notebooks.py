"""The lesson notebooks: the English and Chinese ones hold the same code, are stored without outputs,
and run top to bottom in a fresh kernel (nbclient and ipykernel: test-only dependencies)."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NOTEBOOKS = [os.path.join(ROOT, "notebooks", name) for name in ("lesson.ipynb", "lesson.zh-CN.ipynb")]
RUNNER = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[3])
"""


def cells(path, kind):
    with open(path, encoding="utf-8") as file:
        return [cell for cell in json.load(file)["cells"] if cell["cell_type"] == kind]


def test_both_notebooks_hold_the_same_code_and_no_outputs():
    english, chinese = ([cell["source"] for cell in cells(path, "code")] for path in NOTEBOOKS)
    assert english == chinese and len(english) >= 8
    for path in NOTEBOOKS:
        assert all(cell["outputs"] == [] and cell["execution_count"] is None for cell in cells(path, "code")), path
        assert len(cells(path, "markdown")) == len(cells(NOTEBOOKS[0], "markdown"))
    assert any("的" in "".join(cell["source"]) for cell in cells(NOTEBOOKS[1], "markdown"))


@pytest.mark.slow
def test_the_notebooks_run_top_to_bottom(tmp_path):
    for module in ("nbclient", "ipykernel", "matplotlib"):
        if os.environ.get("MNIST_MLP_REQUIRE_NOTEBOOKS") != "1":
            pytest.importorskip(module)
    # both at once, each in its own kernel (one torch thread each: two cores, two kernels)
    runs = [(path, tmp_path / os.path.basename(path)) for path in NOTEBOOKS]
    processes = [subprocess.Popen([sys.executable, "-c", RUNNER, path, os.path.dirname(path), str(out)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for path, out in runs]
    for process, (path, out) in zip(processes, runs):
        _, errors = process.communicate(timeout=240)
        assert process.returncode == 0, (path, errors[-3000:])
        executed = cells(out, "code")
        assert all(cell["execution_count"] is not None for cell in executed)
        outputs = [output for cell in executed for output in cell["outputs"]]
        assert not [output for output in outputs if output["output_type"] == "error"]
        assert sum("image/png" in output.get("data", {}) for output in outputs) >= 6  # the digits, curve, tiles, ...
        printed = "".join("".join(output.get("text", "")) for output in outputs)
        assert "epoch 3: " in printed and "test accuracy" in printed and "without bias correction" in printed
