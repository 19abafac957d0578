"""The lesson file's promises, held as tinygrad's CI holds its line count: mnist_mlp.py stays short,
imports only torch and the standard library, trains when copied alone; no function in the project
takes more than six parameters; train.py stays short enough to read its loop. And the pages' promises:
a short README, Chinese pages with the English ones' outline and numbers, each command's flags as its
--help prints them, the study's tables as study.py wrote them, no history, no broken link."""

import argparse
import ast
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mnist_mlp
from tests.conftest import ROOT

LESSON = os.path.join(ROOT, "mnist_mlp.py")
# Signatures that mirror torch's own (optimizer constructors, Adam's update) may take more.
MIRRORS_TORCH = {"adam_update", "AdamByHand.__init__", "FlatAdam.__init__"}


def test_the_lesson_is_at_most_320_lines_and_train_py_at_most_320():
    with open(LESSON) as file:
        assert len(file.readlines()) <= 320
    with open(os.path.join(ROOT, "train.py")) as file:
        assert len(file.readlines()) <= 320


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
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))):
        with open(path) as file:
            tree = ast.parse(file.read())
        for parent in ast.walk(tree):
            for node in ast.iter_child_nodes(parent):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{parent.name}.{node.name}" if isinstance(parent, ast.ClassDef) else node.name
                    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                    count = len([a for a in arguments if a.arg not in ("self", "cls")])
                    if count > 6 and name not in MIRRORS_TORCH:
                        too_many.append(f"{os.path.relpath(path, ROOT)}: {name} ({count})")
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
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    accuracy = float(re.search(r"epoch 1: test accuracy ([\d.]+)%", result.stdout).group(1))
    assert accuracy >= 90.0
    assert (tmp_path / "noteLearning_1.pth").is_file()
    assert sorted(os.listdir(raw)) == sorted(name + ".gz" for name in mnist_mlp.RAW_FILES)  # nothing written there


PAGES = ["README.md", "docs/commands.md", "docs/editing-the-model.md", "docs/study.md"]  # each with a Chinese twin
DOCS = sorted(os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "docs", "*.md")))
COMMANDS = ["train", "evaluate", "predict", "draw", "plot", "study", "bench", "tutorial"]


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        return file.read()


def decimals(text):
    """The figures with a point (97.52, 0.0288, 1.062): the numbers a page measures or quotes."""
    return set(re.findall(r"\d+\.\d+", text))


@pytest.mark.parametrize("english", PAGES)
def test_a_chinese_page_has_the_english_pages_outline_and_numbers(english):
    """README.zh-CN.md and each docs/NAME.zh-CN.md: as many sections as the English page, and the same
    figures, each decimal of one in the other."""
    chinese = english.replace(".md", ".zh-CN.md")
    assert decimals(read(chinese)) == decimals(read(english)), (english, chinese)
    assert len(re.findall(r"^## ", read(chinese), re.MULTILINE)) == len(
        re.findall(r"^## ", read(english), re.MULTILINE)
    )


def test_the_readme_is_short_and_every_number_in_it_is_in_the_docs():
    """README.md is for a student (at most 250 lines); the figures its text quotes, the docs measure or
    derive (a program's output shown in a code block is that output, not a figure quoted)."""
    assert len(read("README.md").splitlines()) <= 250
    text = re.sub(r"^```.*?^```", "", read("README.md"), flags=re.MULTILINE | re.DOTALL)
    english_docs = "".join(read(name) for name in DOCS if not name.endswith(".zh-CN.md"))
    assert decimals(text) - decimals(english_docs) == set()


@pytest.mark.parametrize("name", ["README.md", "README.zh-CN.md", *DOCS])
def test_the_pages_say_what_is_true_now_and_link_only_to_what_exists(name):
    """No history in the pages (git keeps it), and every relative link and picture resolves."""
    text = read(name)
    history = re.findall(
        r"this round|earlier session|earlier default|older command lines|\bcommit [0-9a-f]{7}|本轮|上一轮",
        text,
        re.IGNORECASE,
    )
    assert history == [], (name, history)
    folder = os.path.dirname(os.path.join(ROOT, name))
    targets = [
        target.split("#")[0]
        for target in re.findall(r"\]\(([^)\s]+)\)", text)
        if not re.match(r"[a-z]+:", target) and not target.startswith("#")
    ]
    assert [target for target in targets if not os.path.exists(os.path.join(folder, target))] == [], name


@pytest.mark.parametrize("page", ["docs/commands.md", "docs/commands.zh-CN.md"])
def test_the_commands_pages_show_each_commands_current_help(page, capsys, monkeypatch):
    """Each block marked <!-- help: NAME --> is NAME.py --help as it prints it at 100 columns (word for word, so on
    any Python), the repository's data folder written mnist-mlp/data: a flag added or changed is a flag documented."""
    blocks = dict(re.findall(r"<!-- help: (\w+) -->\n```text\n(.*?)\n```", read(page), re.DOTALL))
    assert sorted(blocks) == sorted(COMMANDS)
    monkeypatch.setenv("COLUMNS", "100")
    for name in COMMANDS:
        monkeypatch.setattr(sys, "argv", [f"{name}.py"])
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:  # argparse's own exit after printing the help
            importlib.import_module(name).main(["--help"])
        printed = capsys.readouterr().out
        assert stopped.value.code == 0
        printed = printed.replace(os.path.join(ROOT, "data"), "mnist-mlp/data")
        assert help_words(blocks[name]) == help_words(printed), name


def help_words(text):
    """A --help text as words, the same on every argparse: the columns and line breaks left out (they move
    with the widest flag), and an option's metavar written once, as Python 3.13 writes `-o, --output PATH`."""
    return re.sub(r"(-\w) (\S+), (--[\w-]+) \2\b", r"\1, \3 \2", " ".join(text.split()))


@settings(max_examples=60, deadline=None)
@given(
    flags=st.lists(
        st.tuples(
            st.text("abcdefgi", min_size=1, max_size=1),  # not h: -h is --help
            st.text("abcdefghij-", min_size=2, max_size=12).filter(lambda name: name[0] != "-"),
            st.text("ABCDEFG_.", min_size=1, max_size=10),
            st.lists(st.text("abcdefgh", min_size=1, max_size=9), max_size=25).map(" ".join),
        ),
        max_size=6,
        unique_by=(lambda flag: flag[0], lambda flag: flag[1]),
    ),
    widths=st.tuples(st.integers(30, 200), st.integers(30, 200)),
)
def test_help_words_are_the_same_at_any_width(flags, widths):
    """The rule behind the comparison: argparse wraps a help text by the terminal's width (and its columns move with
    the widest flag), never changing its words."""
    texts = []
    for width in widths:
        parser = argparse.ArgumentParser(
            prog="x.py", formatter_class=lambda prog: argparse.HelpFormatter(prog, width=width)
        )
        for short, long, metavar, words in flags:
            parser.add_argument(f"-{short}", f"--{long}", metavar=metavar, help=words or None)
        texts.append(help_words(parser.format_help()))
    assert texts[0] == texts[1]


def test_help_words_hold_across_argparse_versions():
    python_3_11 = "options:\n  -o PATH.png, --output PATH.png\n                        where to write"
    python_3_13 = "options:\n  -o, --output PATH.png  where to write"
    assert help_words(python_3_11) == help_words(python_3_13) == "options: -o, --output PATH.png where to write"
    assert help_words("--epochs EPOCHS  how many") != help_words("--epochs EPOCHS  how few")


@pytest.mark.parametrize(
    "page, end", [("docs/study.md", "## The blog's sentences"), ("docs/study.zh-CN.md", "## 逐条检验")]
)
def test_the_study_pages_quote_study_pys_tables(page, end):
    """Every table of the study (before the blog's sentences are judged) is one of study-tables.md's,
    study.py's own output, in its order; every decimal quoted is one of its figures, or a constant of
    the maths (3.16, 0.99, ...)."""
    study = read("docs/study-tables.md")
    section = read(page).split(end)[0]
    tables = re.findall(r"(?:^\|.*\n)+", section, re.MULTILINE)
    assert len(tables) >= 9
    positions = [study.index(table) for table in tables]  # each one verbatim in study-tables.md ...
    assert positions == sorted(positions)  # ... and in its order
    constants = {"0.5", "0.9", "0.999", "3.16", "6.57", "0.99", "97.5", "0.16", "0.10", "2.14", "14.1"}
    assert decimals(section) - decimals(study) - constants == set()
