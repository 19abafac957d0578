"""The lesson file's promises, held as tinygrad's CI holds its line count: mnist_mlp.py stays short,
imports only torch and the standard library, trains when copied alone; no function in the project
takes more than six parameters; train.py stays short enough to read its loop."""

import ast
import glob
import os

import pytest
import re
import shutil
import subprocess
import sys
import textwrap

import mnist_mlp
from tests.conftest import ROOT

LESSON = os.path.join(ROOT, "mnist_mlp.py")
# Signatures that mirror torch's own (optimizer constructors, Adam's update) may take more.
MIRRORS_TORCH = {"adam_update", "AdamByHand.__init__", "FlatAdam.__init__"}


def test_the_lesson_is_at_most_320_lines_and_train_py_at_most_220():
    with open(LESSON) as file:
        assert len(file.readlines()) <= 320
    with open(os.path.join(ROOT, "train.py")) as file:
        assert len(file.readlines()) <= 220


def test_the_lesson_imports_only_torch_and_the_standard_library():
    with open(LESSON) as file:
        tree = ast.parse(file.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert "torch" in imported
    assert imported - {"torch"} <= set(sys.stdlib_module_names), imported


def test_no_function_takes_more_than_six_parameters():
    too_many = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        with open(path) as file:
            tree = ast.parse(file.read())
        for parent in ast.walk(tree):
            for node in ast.iter_child_nodes(parent):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{parent.name}.{node.name}" if isinstance(parent, ast.ClassDef) else node.name
                    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    count = len([a for a in arguments if a.arg not in ("self", "cls")])
                    if count > 6 and name not in MIRRORS_TORCH:
                        too_many.append(f"{os.path.basename(path)}: {name} ({count})")
    assert too_many == []


@pytest.mark.slow
def test_the_lesson_copied_alone_trains_with_the_program_in_its_docstring(tmp_path):
    """A student copies mnist_mlp.py and the data into an empty folder and runs the docstring's program
    (one epoch of it here): it trains, reading the .gz files itself."""
    shutil.copy(LESSON, tmp_path / "mnist_mlp.py")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist_mlp.RAW_FILES:
        shutil.copy(os.path.join(ROOT, "data", "MNIST", "raw", name + ".gz"), raw)
    program = textwrap.dedent(mnist_mlp.__doc__.split("data/MNIST/raw/):\n")[1])
    assert program.strip().startswith("import torch") and "for epoch in range(1, 21):" in program
    program = "import torch\ntorch.set_num_threads(1)\n" + program.replace("range(1, 21)", "range(1, 2)")
    result = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"epoch 1: test accuracy ([\d.]+)%", result.stdout).group(1))
    assert accuracy >= 90.0
    assert (tmp_path / "noteLearning_1.pth").is_file()
    assert sorted(os.listdir(raw)) == sorted(name + ".gz" for name in mnist_mlp.RAW_FILES)  # nothing written there


def test_every_number_of_the_chinese_readme_is_the_english_ones():
    """README.zh-CN.md carries the same numbers as README.md: each decimal in it (a figure with a
    point, such as 97.52 or 0.0288) appears in README.md too."""
    import re
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        english = set(re.findall(r"\d+\.\d+", file.read()))
    with open(os.path.join(ROOT, "README.zh-CN.md"), encoding="utf-8") as file:
        chinese = set(re.findall(r"\d+\.\d+", file.read()))
    assert chinese - english == set()


def study_section(name, start, end):
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        text = file.read()
    return text[text.index(start):text.index(end)]


@pytest.mark.parametrize("name, start, end", [
    ("README.md", "## Adam, SGD and bias correction", "## Validation"),
    ("README.zh-CN.md", "## 教程的两个问题", "## 该保留哪个 checkpoint")])
def test_the_readmes_study_numbers_are_study_mds(name, start, end):
    """Every table of the study section is one of docs/study.md's (this round's study.py), in its order,
    and every decimal quoted is one of its figures, or a constant of the maths (3.16, 0.99, ...)."""
    import re
    with open(os.path.join(ROOT, "docs", "study.md"), encoding="utf-8") as file:
        study = file.read()
    section = study_section(name, start, end).split("## 逐条检验")[0].split("## The blog's sentences")[0]
    tables = re.findall(r"(?:^\|.*\n)+", section, re.MULTILINE)
    assert len(tables) >= 9
    positions = [study.index(table) for table in tables]  # each one verbatim in study.md ...
    assert positions == sorted(positions)                   # ... and in study.md's order
    constants = {"0.5", "0.9", "0.999", "3.16", "6.57", "0.99", "97.5", "0.16", "0.10", "2.14", "14.1"}
    quoted = set(re.findall(r"\d+\.\d+", section))
    assert quoted - set(re.findall(r"\d+\.\d+", study)) - constants == set()
