"""The lesson notebooks: the English and Chinese ones hold the same code, are stored without outputs,
and run top to bottom in a fresh kernel (nbclient and ipykernel: test-only dependencies)."""

import json
import os

import pytest

from tests.conftest import NOTEBOOKS


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
def test_the_notebooks_run_top_to_bottom(started_notebooks):
    for module in ("nbclient", "ipykernel", "matplotlib"):
        if os.environ.get("MNIST_MLP_REQUIRE_NOTEBOOKS") != "1":
            pytest.importorskip(module)
    for path, out, process in started_notebooks:  # running since the session started
        _, errors = process.communicate(timeout=240)
        assert process.returncode == 0, (path, errors[-3000:])
        executed = cells(out, "code")
        assert all(cell["execution_count"] is not None for cell in executed)
        outputs = [output for cell in executed for output in cell["outputs"]]
        assert not [output for output in outputs if output["output_type"] == "error"]
        assert sum("image/png" in output.get("data", {}) for output in outputs) >= 6  # the digits, curve, tiles, ...
        printed = "".join("".join(output.get("text", "")) for output in outputs)
        assert "epoch 3: " in printed and "test accuracy" in printed and "without bias correction" in printed
        compared = (
            "Adam, lr 0.001 (the blog's)",
            "SGD, lr 0.001 (the blog's lr)",
            "SGD, lr 0.1",
            "SGD with momentum 0.9",
        )
        assert all(f"\n{name}" in printed and "%, " in printed.split(f"\n{name}")[1] for name in compared)
        moments = [line.split() for line in printed.splitlines() if line[:2] in (" 1", "12")]
        ratios = [float(row[-1]) for row in moments if len(row) == 9]  # Adam's first and twelfth step, one weight
        assert ratios == [3.16, 6.57]  # (1 - beta1^t) / sqrt(1 - beta2^t), whatever the gradients
