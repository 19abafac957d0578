"""A student's own model on a student's own machine: every kind of edit of NoteModel through train,
evaluate, predict, draw's API and resume; an old checkpoint read by an edited model; the widths rule;
Windows and macOS (the POSIX-only APIs hidden); notebooks; second runs; flags before torch."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import draw
import evaluate
import mnist_mlp
import predict
import train
import tutorial
from mnist_mlp_tools import commands, run_folder
from tests.conftest import ROOT, DropoutModel, SigmoidModel, assert_usage_error, make_tiny_mnist, run_main, tiny_run

DIGITS = os.path.join(ROOT, "data", "digits")


class AddedLayer(nn.Module):
    """The tutorial's own form, __init__(self) without widths, with a fourth layer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 128), nn.Linear(128, 64)
        self.fc3, self.fc4 = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.view(-1, 784)))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


class NoWidths(tutorial.NoteModel):
    """The blog's NoteModel exactly (tutorial.py's): __init__(self), the widths written inside."""


class OtherWidths(mnist_mlp.NoteModel):
    """Other default widths."""

    def __init__(self, hidden1=96, hidden2=48):
        super().__init__(hidden1, hidden2)


class ThreeWidths(nn.Module):
    """Another depth, its widths as arguments: --hidden takes three."""

    def __init__(self, hidden1=64, hidden2=32, hidden3=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, hidden1), nn.Linear(hidden1, hidden2)
        self.fc3, self.fc4 = nn.Linear(hidden2, hidden3), nn.Linear(hidden3, 10)

    def forward(self, x):
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


class WithBatchNorm(mnist_mlp.NoteModel):
    """BatchNorm after each hidden layer: buffers (running statistics, an int64 counter) in the state."""

    def __init__(self, hidden1=128, hidden2=64):
        super().__init__(hidden1, hidden2)
        self.bn1, self.bn2 = nn.BatchNorm1d(hidden1), nn.BatchNorm1d(hidden2)

    def forward(self, x):
        x = F.relu(self.bn1(self.fc1(x.view(-1, 784))))
        x = F.relu(self.bn2(self.fc2(x)))
        return self.fc3(x)


class SmallCNN(nn.Module):
    """A convolution, the usual next assignment: it needs the (N, 1, 28, 28) images."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.fc1(x.flatten(1))


EDITS = [AddedLayer, NoWidths, OtherWidths, ThreeWidths, WithBatchNorm, DropoutModel, SigmoidModel, SmallCNN]


def png_bytes(path):
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("model_class", EDITS, ids=lambda model_class: model_class.__name__)
def test_every_kind_of_edit_trains_evaluates_predicts_draws_and_resumes_exactly(
    model_class, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mnist_mlp, "NoteModel", model_class)
    folder, straight = tmp_path / "out", tmp_path / "straight"
    code, out, err = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)
    assert code == 0 and err == "", err
    checkpoint = folder / "noteLearning_1.pth"
    code, out, err = run_main(
        evaluate,
        [checkpoint, "--data-dir", tmp_path / "data", "--json", "--save-weights", tmp_path / "weights.png"],
        capsys,
    )
    if model_class is SmallCNN:  # the weight picture needs a first Linear(784, units): said in one line
        assert_usage_error(code, err, "--save-weights", "nn.Linear(784, units)", "Conv2d")
        code, out, err = run_main(evaluate, [checkpoint, "--data-dir", tmp_path / "data", "--json"], capsys)
    else:
        assert (tmp_path / "weights.png").read_bytes()[:4] == b"\x89PNG"
    assert code == 0 and err == "" and json.loads(out)["total"] == 64
    code, out, err = run_main(predict, [checkpoint, DIGITS, "--json"], capsys)
    assert code == 0 and err == "" and len(json.loads(out)["predictions"]) == 8
    answer = draw.DigitReader(str(checkpoint)).read(png_bytes(os.path.join(DIGITS, "7_pen.png")))
    assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-5
    code, _, err = run_main(
        train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder, "--resume", checkpoint), capsys
    )
    assert code == 0 and err == "", err
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", straight), capsys)[0] == 0
    resumed = torch.load(folder / "noteLearning_2.pth", weights_only=True)["model"]
    uninterrupted = torch.load(straight / "noteLearning_2.pth", weights_only=True)["model"]
    assert list(resumed) == list(uninterrupted)  # BatchNorm's statistics and counter included
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


@pytest.fixture(scope="module")
def tutorial_checkpoint(tmp_path_factory):
    """A checkpoint of the unedited NoteModel (one epoch on a tiny dataset): (path, data folder)."""
    root = tmp_path_factory.mktemp("old")
    make_tiny_mnist(root / "data")
    assert train.main(tiny_run(root, "--epochs", "1", "--checkpoint-dir", root / "out")) == 0
    return root / "out" / "noteLearning_1.pth", root / "data"


@pytest.mark.parametrize("model_class", EDITS, ids=lambda model_class: model_class.__name__)
def test_an_old_checkpoint_read_by_an_edited_model_is_one_line_or_a_warning(
    model_class, tutorial_checkpoint, monkeypatch, capsys
):
    path, data = tutorial_checkpoint
    old = torch.load(path, weights_only=True)["model"]
    monkeypatch.setattr(mnist_mlp, "NoteModel", model_class)
    built = model_class(
        *([128, 64] if model_class in (OtherWidths, ThreeWidths, WithBatchNorm, DropoutModel, SigmoidModel) else [])
    )
    expected = built.state_dict()
    missing = [name for name in expected if name not in old]
    unexpected = [name for name in old if name not in expected]
    reshaped = [name for name in expected if name in old and old[name].shape != expected[name].shape]
    code, out, err = run_main(evaluate, [path, "--data-dir", data], capsys)
    if missing or unexpected or reshaped:  # does not fit: one line naming each difference, each side named
        assert_usage_error(
            code,
            err,
            "does not fit NoteModel in mnist_mlp.py",
            "another version of NoteModel",
            *missing[:4],
            *unexpected[:4],
            *reshaped[:3],
        )
        if missing:
            assert "that the checkpoint lacks" in err
        if unexpected:
            assert "that NoteModel lacks" in err
        if len(missing) > 4:
            assert f"and {len(missing) - 4} more" in err
    else:  # fits, but trained by other code: evaluated, with one warning line
        assert code == 0 and "accuracy" in out
        assert err.count("\n") == 1 and err.startswith("warning: ") and "another version of NoteModel" in err


def test_the_unedited_model_reads_its_checkpoint_without_a_word(tutorial_checkpoint, capsys):
    code, _, err = run_main(evaluate, [tutorial_checkpoint[0], "--data-dir", tutorial_checkpoint[1]], capsys)
    assert code == 0 and err == ""


class NeedsWidths(nn.Module):
    def __init__(self, hidden1, hidden2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, hidden1), nn.Linear(hidden1, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class BrokenInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 10, bias="yes please", device="no such device")


class TwelveOutputs(NoWidths):
    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(64, 12)


class WrongShapes(NoWidths):
    def forward(self, x):
        return self.fc2(self.fc1(x.view(-1, 780)))


@pytest.mark.parametrize(
    "model_class, flags, words",
    [
        (NoWidths, ["--hidden", "128", "64"], ["takes no widths", "leave out --hidden"]),
        (
            mnist_mlp.NoteModel,
            ["--hidden", "256", "128", "64"],
            ["--hidden got 3 widths (256 128 64)", "NoteModel(hidden1, hidden2)", "takes 2", "edit of NoteModel"],
        ),
        (ThreeWidths, ["--hidden", "32", "16"], ["--hidden got 2 widths", "NoteModel(hidden1, hidden2, hidden3)"]),
        (NeedsWidths, [], ["widths without defaults", "--hidden HIDDEN1 HIDDEN2"]),
        (BrokenInit, [], ["NoteModel() in mnist_mlp.py failed"]),
        (TwelveOutputs, [], ["gives [2, 12] for 2 images", "[2, 10]"]),
        (WrongShapes, [], ["forward() in mnist_mlp.py fails on a batch of images (N, 1, 28, 28)", "RuntimeError"]),
    ],
)
def test_a_model_or_flags_that_do_not_fit_are_one_line_and_nothing_is_written(
    model_class, flags, words, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mnist_mlp, "NoteModel", model_class)
    code, _, err = run_main(train, tiny_run(tmp_path, "--checkpoint-dir", tmp_path / "out", *flags), capsys)
    assert_usage_error(code, err, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model_class, flags, recorded",
    [
        (NoWidths, [], []),  # nothing passed, nothing recorded
        (ThreeWidths, ["--hidden", "40", "30", "20"], [40, 30, 20]),
        (ThreeWidths, [], [64, 32, 16]),  # its own defaults, recorded
        (NeedsWidths, ["--hidden", "20", "7"], [20, 7]),
    ],
)
def test_widths_are_passed_only_to_a_model_that_takes_them_and_recorded(
    model_class, flags, recorded, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(mnist_mlp, "NoteModel", model_class)
    code, _, err = run_main(
        train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", tmp_path / "out", *flags), capsys
    )
    assert code == 0, err
    checkpoint = torch.load(tmp_path / "out" / "noteLearning_1.pth", weights_only=True)
    assert checkpoint["config"]["hidden"] == recorded
    assert (
        run_main(evaluate, [tmp_path / "out" / "noteLearning_1.pth", "--data-dir", tmp_path / "data"], capsys)[0] == 0
    )


def test_a_resume_takes_the_checkpoints_widths_without_hidden(tmp_path, capsys):
    folder = tmp_path / "out"
    assert (
        run_main(
            train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--hidden", "32", "16"), capsys
        )[0]
        == 0
    )
    code, out, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_1.pth"),
        capsys,
    )
    assert code == 0, err
    assert torch.load(folder / "noteLearning_2.pth", weights_only=True)["config"]["hidden"] == [32, 16]


# ----------------------------------------------------------------------------- Windows and macOS

HIDE_POSIX = """
import os, signal, sys
import torch, torchvision  # first: Linux's torch calls os.sysconf at import, where a Windows torch takes its own paths
assert "filelock" not in sys.modules  # so that filelock, imported below, chooses its lock without fcntl
sys.modules["fcntl"] = None  # `import fcntl` raises ImportError, as on Windows
for name in ("O_NOFOLLOW", "O_NONBLOCK", "O_CLOEXEC", "pread", "pwrite", "sysconf", "fchmod"):
    if hasattr(os, name):
        delattr(os, name)
for name in ("SIGKILL", "SIGPIPE", "SIGHUP", "SIGQUIT", "SIGALRM", "SIGUSR1", "SIGUSR2"):  # POSIX-only signals
    if hasattr(signal, name):
        delattr(signal, name)
"""

USER_PATHS = """
import json, os, sys
sys.path.insert(0, {here!r})
import draw, evaluate, plot, predict, train
from mnist_mlp_tools import run_folder
from mnist_mlp_tools.commands import UsageError
assert not hasattr(os, "pwrite")
data, out = {data!r}, {out!r}
tiny = ["--data-dir", data, "--device", "cpu", "--batch-size", "32", "--checkpoint-dir", out]
assert train.main([*tiny, "--epochs", "1"]) == 0
assert train.main([*tiny, "--epochs", "2", "--resume", os.path.join(out, "noteLearning_1.pth")]) == 0
checkpoint = os.path.join(out, "noteLearning_2.pth")
assert evaluate.main([checkpoint, "--data-dir", data]) == 0
assert predict.main([checkpoint, {digits!r}]) == 0
with open(os.path.join({digits!r}, "7_pen.png"), "rb") as file:
    assert len(draw.DigitReader(checkpoint).read(file.read())["probabilities"]) == 10
assert plot.main([out, "--output", os.path.join(out, "curves.png")]) == 0
with run_folder.FolderLock(out):  # filelock's fallback lock: the file itself, created exclusively
    try:
        run_folder.FolderLock(out).__enter__()
        raise SystemExit("a second lock was taken")
    except UsageError as error:
        assert "another train.py" in str(error) and "if none is running, remove" in str(error)
assert not os.path.exists(os.path.join(out, ".train.lock"))
print("every path ran")
"""


@pytest.mark.slow
def test_the_user_paths_run_with_the_posix_only_apis_hidden(tmp_path):
    """As on Windows: no fcntl, O_NOFOLLOW, O_NONBLOCK, O_CLOEXEC, pread/pwrite, sysconf, fchmod or POSIX-only
    signals, hidden before anything of ours or filelock is imported: train, resume, evaluate, predict, draw's API,
    plot, the lock."""
    pytest.importorskip("matplotlib")
    make_tiny_mnist(tmp_path / "data")
    program = HIDE_POSIX + USER_PATHS.format(
        here=ROOT, data=str(tmp_path / "data"), out=str(tmp_path / "out"), digits=DIGITS
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "every path ran" in result.stdout, result.stderr[-3000:]


def test_the_lock_refuses_a_second_run_and_leaves_nothing(tmp_path):
    with run_folder.FolderLock(str(tmp_path)):
        with pytest.raises(commands.UsageError, match="another train.py is writing to .*remove .*train.lock"):
            run_folder.FolderLock(str(tmp_path)).__enter__()
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- notebooks and the command line


def test_main_without_arguments_reads_no_kernel_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1234.json"])
    seen = []
    assert commands.run_main(lambda argv: seen.append(argv) or 0, None) == 0 and seen == [[]]
    code = evaluate.main()
    err = capsys.readouterr().err
    assert code == 2 and "the following arguments are required: CHECKPOINT" in err and "-f" not in err


SCRIPTS = ["train", "evaluate", "predict", "draw", "plot", "bench", "study"]  # tutorial.py: the blog's imports first


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_a_bad_flag_and_a_missing_file_answer_before_torch_loads(script, tmp_path):
    def run(*argv):
        program = (
            f"import runpy, sys\nsys.path.insert(0, {ROOT!r})\nsys.argv = {[script + '.py', *argv]!r}\n"
            f"try:\n    runpy.run_path({os.path.join(ROOT, script + '.py')!r}, run_name='__main__')\n"
            "except SystemExit as stop:\n    print('exit', stop.code)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')"
        )
        return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=tmp_path)

    for argv, code in ((["--help"], 0), (["--no-such-flag"], 2)):
        result = run(*argv)
        assert result.stdout.splitlines()[-2:] == [f"exit {code}", "torch not loaded"], (argv, result.stderr)
    if script in ("evaluate", "predict", "draw"):
        result = run("missing.pth", *(["x.png"] if script == "predict" else []))
        assert result.stdout.splitlines()[-2:] == ["exit 2", "torch not loaded"]
        assert f"missing.pth: no such file in {tmp_path} (the current folder)" in result.stderr


def test_a_mistyped_flag_gets_the_nearest_one_and_hidden_its_count(capsys):
    assert_usage_error(
        *run_main(train, ["--epohcs", "3"], capsys)[::2], "unrecognized arguments: --epohcs", "did you mean --epochs?"
    )
    assert_usage_error(*run_main(evaluate, ["x.pth", "--bach-size", "3"], capsys)[::2], "did you mean --batch-size?")


def test_the_dataset_names_the_flags_offer_are_the_lessons():
    assert commands.DATASET_NAMES == tuple(mnist_mlp.DATASETS)


def test_every_command_defaults_to_the_same_device():
    for module in (train, evaluate, predict, draw):
        argv = {"evaluate": [__file__], "predict": [__file__, "x.png"], "draw": [__file__]}.get(module.__name__, [])
        assert module.parse_args(argv).device == "auto", module.__name__
    import bench

    assert bench.parse_args([]).device == "auto"


def test_not_a_checkpoint_is_said_in_one_line(tmp_path, capsys):
    for name, content in (("metrics.csv", "epoch,train_loss\n1,0.5\n"), ("README.md", "# hello\n"), ("empty.pth", "")):
        (tmp_path / name).write_text(content)
        assert_usage_error(*run_main(evaluate, [tmp_path / name], capsys)[::2], "not a checkpoint written by train.py")


def test_a_relative_path_that_is_not_there_says_where_it_was_looked_for(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(predict, [trained[0] / "noteLearning_1.pth", os.path.join("data", "digits")], capsys)
    assert code == 2
    assert f"no such file or folder in {tmp_path} (the current folder); there is one beside predict.py: {DIGITS}" in err


def test_predict_reads_on_one_thread_and_gives_the_threads_back(trained, monkeypatch, capsys):
    from mnist_mlp_tools import handwriting

    seen, probabilities = [], handwriting.class_probabilities
    monkeypatch.setattr(
        handwriting, "class_probabilities", lambda *args: seen.append(torch.get_num_threads()) or probabilities(*args)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_main(predict, [trained[0] / "noteLearning_1.pth", DIGITS], capsys)[0] == 0
        assert seen == [1] * 8 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_python_mnist_mlp_py_runs_the_docstrings_program(tmp_path):
    shutil.copy(os.path.join(ROOT, "mnist_mlp.py"), tmp_path)
    make_tiny_mnist(tmp_path / "data", n_train=128, n_test=32)
    result = subprocess.run(
        [sys.executable, "mnist_mlp.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"epoch {epoch}" for epoch in range(1, 21)]
    assert lines[-1] == "epoch 20: test accuracy 100.00%"
    assert sorted(os.listdir(tmp_path)).count("noteLearning_20.pth") == 1


# ----------------------------------------------------------------------------- second runs


def test_a_second_run_is_told_the_command_that_continues_the_first(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)[0] == 0
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "5", "--checkpoint-dir", folder), capsys)
    assert_usage_error(
        code,
        err,
        "already holds a run that reached epoch 3",
        "continue it with: python",
        f"--epochs 5 --checkpoint-dir {folder} --resume {folder / 'noteLearning_3.pth'}",
    )
    command = err.split("continue it with: ")[1].split(";")[0].split()
    assert run_main(train, command[2:], capsys)[0] == 0  # the command as printed, less `python train.py`
    assert sorted(name for name in os.listdir(folder) if name.endswith(".pth"))[-1] == "noteLearning_5.pth"
    # resuming from epoch 3 again: its epochs 4-5 would be replaced, and only --overwrite does it
    before = (folder / "noteLearning_5.pth").read_bytes()
    again = tiny_run(tmp_path, "--epochs", "5", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_3.pth")
    assert_usage_error(*run_main(train, again, capsys)[::2], "would replace epochs 4-5 of this same run", "--overwrite")
    assert (folder / "noteLearning_5.pth").read_bytes() == before
    code, out, _ = run_main(train, [*again, "--overwrite"], capsys)
    assert code == 0 and f"--overwrite: removed noteLearning_4.pth, noteLearning_5.pth from {folder}" in out


def test_tutorial_py_writes_into_a_folder_of_its_own():
    import tutorial

    assert tutorial.parse_args([]).checkpoint_dir == "tutorial_run"


def test_draw_serves_on_one_thread_and_gives_the_threads_back(trained, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(draw.Server, "serve_forever", lambda server: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_main(draw, [trained[0] / "noteLearning_1.pth", "--port", "0"], capsys)[0] == 0
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
