"""train.py: its output and checkpoints, bad flags, resuming, one run per folder, and what a kill,
Ctrl-C, SIGTERM, a full disk or a closed pipe leave behind."""

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import evaluate
import mnist_mlp
import train
from mnist_mlp_tools import checkpoints, commands, data_files, models
from tests.conftest import ROOT, WARM_PYTHON, assert_usage_error, make_tiny_mnist, run_at_once, run_main, tiny_run


def test_same_seed_twice_gives_identical_weights(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    states = []
    for run in ("a", "b"):
        code, _, _ = run_main(
            train,
            ["--epochs", "2", "--data-dir", root, "--checkpoint-dir", tmp_path / run, "--device", "cpu", "--seed", "3"],
            capsys,
        )
        assert code == 0
        states.append(torch.load(tmp_path / run / "noteLearning_2.pth", weights_only=True)["model"])
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


def test_tiny_idx_dataset_trains_and_checkpoints(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    code, out, _ = run_main(
        train,
        [
            "--epochs",
            "3",
            "--data-dir",
            root,
            "--checkpoint-dir",
            tmp_path,
            "--device",
            "cpu",
            "--batch-size",
            "32",
            "--log-interval",
            "4",
        ],
        capsys,
    )
    assert code == 0
    assert "epoch 1/3  step 4/8  loss" in out
    for epoch in (1, 2, 3):
        checkpoint = torch.load(tmp_path / f"noteLearning_{epoch}.pth", weights_only=True, map_location="cpu")
        assert checkpoint["epoch"] == epoch
    assert checkpoint["metrics"]["test_accuracy"] == 100.0  # the bars are easy to tell apart
    run_id = checkpoint["config"].pop("run")  # the run's identity: the same in every epoch's checkpoint
    assert len(run_id) == 32 and run_id.isalnum()
    assert checkpoint["config"] == {
        "hidden": [128, 64],
        "optimizer": "adam",
        "lr": 0.001,
        "betas": [0.9, 0.999],
        "eps": 1e-08,
        "weight_decay": 0,
        "inputs": "tutorial",
        "batch_size": 32,
        "seed": 1,
        "dataset": "mnist",
        "val_size": 0,
        "fused": False,
        "threads": 1,
        "model_source": models.source_fingerprint(),
    }
    with open(tmp_path / "metrics.csv") as file:
        lines = file.read().splitlines()
    assert lines[0].startswith("epoch,train_loss,")
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3"]


def test_one_epoch_on_real_mnist_reaches_90_percent(trained):
    folder, output = trained
    final = [line for line in output.splitlines() if line.startswith("epoch 1/1  train loss")]
    assert len(final) == 1
    accuracy = float(final[0].split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    assert "epoch 1/1  step 900/938  loss" in output
    assert (folder / "noteLearning_1.pth").is_file()
    with open(folder / "metrics.csv") as file:
        rows = file.read().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[5] == f"{accuracy:.2f}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--epochs", "0"], ["--epochs", "from 1"]),
        (["--batch-size", "-3"], ["--batch-size"]),
        (["--lr", "0"], ["--lr", "positive"]),
        (["--lr", "-0.1"], ["--lr"]),
        (["--optimizer", "rmsprop"], ["--optimizer"]),
    ],
)
def test_train_rejects_bad_numbers(argv, words, capsys):
    assert_usage_error(*run_main(train, argv, capsys)[::2], *words)


def test_unavailable_device_is_an_error_not_a_fallback(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(train, ["--device", "cuda", "--checkpoint-dir", tmp_path], capsys)
    assert_usage_error(code, err, "CUDA is not available")
    assert_usage_error(*run_main(train, ["--device", "tpu"], capsys)[::2], "tpu")
    assert os.listdir(tmp_path) == []


def test_scripts_exit_2_with_one_line_in_a_real_process(tmp_path):
    for argv in (["train.py", "--epochs", "0"], ["evaluate.py", str(tmp_path / "missing.pth")]):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]], capture_output=True, text=True, cwd=tmp_path
        )
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--epochs",
        "(default: 20)",
        "(default: 64)",
        "(default: 0.001)",
        "(default: adam)",
        "training (the tutorial's settings by default):",
        "data:",
        "output and resuming:",
        "speed (",
    ):
        assert text in out
    assert "(default: False)" not in out and "(default: None)" not in out and "(default: True)" not in out


def test_resume_continues_bit_identically_without_rewriting_earlier_epochs(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", straight), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", split), capsys)[0] == 0
    first = (split / "noteLearning_1.pth").read_bytes()
    code, out, _ = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", split, "--resume", split / "noteLearning_1.pth"),
        capsys,
    )
    assert code == 0 and "epoch 1/3" not in out and "epoch 2/3" in out
    assert (split / "noteLearning_1.pth").read_bytes() == first
    a = torch.load(straight / "noteLearning_3.pth", weights_only=True)
    b = torch.load(split / "noteLearning_3.pth", weights_only=True)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    timing = {"seconds", "samples_per_s"}
    assert {key: value for key, value in a["metrics"].items() if key not in timing} == {
        key: value for key, value in b["metrics"].items() if key not in timing
    }
    assert (straight / "metrics.csv").read_text().split("\n")[1:] and [
        row.split(",")[:6] for row in (straight / "metrics.csv").read_text().splitlines()
    ] == [row.split(",")[:6] for row in (split / "metrics.csv").read_text().splitlines()]


def test_resume_refuses_other_hidden_sizes_and_finished_runs(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    before = (folder / "noteLearning_1.pth").read_bytes()
    code, _, err = run_main(
        train,
        tiny_run(
            tmp_path,
            "--epochs",
            "2",
            "--checkpoint-dir",
            folder,
            "--hidden",
            "32",
            "16",
            "--resume",
            folder / "noteLearning_1.pth",
        ),
        capsys,
    )
    assert_usage_error(code, err, "widths [128, 64]", "--hidden 128 64")
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_1.pth"),
        capsys,
    )
    assert_usage_error(code, err, "already at epoch 1")
    assert (folder / "noteLearning_1.pth").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["metrics.csv", "noteLearning_1.pth"]


KILLER = """
import io, os, signal, sys
sys.path.insert(0, {here!r})
import torch, train
from mnist_mlp_tools import fast_step, safe_files

moment, epoch = sys.argv[1], int(sys.argv[2])
real_atomic_write = safe_files.atomic_write

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def atomic_write(path, write):
    name = os.path.basename(path)
    if (moment == "checkpoint" and name == f"noteLearning_{{epoch}}.pth") or \\
       (moment == "metrics" and name == "metrics.csv" and os.path.exists(f"noteLearning_{{epoch}}.pth")):
        def write_half(file):
            buffer = io.BytesIO()
            write(buffer)
            file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            file.flush()
            die()
        return real_atomic_write(path, write_half)
    return real_atomic_write(path, write)

safe_files.atomic_write = atomic_write
if moment == "step":
    real_call, calls = fast_step.FastStep.__call__, []
    def call(self, x, labels):
        calls.append(1)
        if len(calls) == epoch:
            die()
        return real_call(self, x, labels)
    fast_step.FastStep.__call__ = call
sys.exit(train.main(sys.argv[3:]))
"""


@pytest.mark.parametrize(
    "moment, epoch, survivors",
    [
        ("checkpoint", 2, [1]),  # killed halfway through writing noteLearning_2.pth
        ("checkpoint", 1, []),
        ("metrics", 2, [1, 2]),  # killed halfway through rewriting metrics.csv
        ("step", 20, [1, 2]),  # killed in the middle of epoch 3 (8 steps an epoch)
    ],
)
@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_only_complete_files(tmp_path, moment, epoch, survivors):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(here=ROOT))
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "4", "--checkpoint-dir", ".")]
    result = subprocess.run(
        [*WARM_PYTHON, str(script), moment, str(epoch), *argv], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == -9, result.stderr
    files = sorted(name for name in os.listdir(tmp_path) if name.endswith(".pth"))
    assert files == [f"noteLearning_{number}.pth" for number in survivors]
    for name in files:
        checkpoint = checkpoints.load_checkpoint(str(tmp_path / name))
        assert checkpoint["epoch"] == int(name.split("_")[1].split(".")[0])
        models.model_from_checkpoint(name, checkpoint)
    if survivors:
        rows = (tmp_path / "metrics.csv").read_text().splitlines()
        assert [row.split(",")[0] for row in rows[1:]] == [str(n) for n in survivors[: len(rows) - 1]]
        assert len(rows) - 1 >= len(survivors) - (moment == "metrics")
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert all(name.startswith(".") for name in leftovers)  # hidden temp files, never a final name


def start_training(tmp_path, argv, wait_for, stdout=subprocess.DEVNULL, python=WARM_PYTHON):
    """Start train.py in its own process in tmp_path; return it once tmp_path/wait_for exists."""
    process = subprocess.Popen(
        [*python, os.path.join(ROOT, "train.py"), *argv], cwd=tmp_path, stdout=stdout, stderr=subprocess.PIPE, text=True
    )
    for _ in range(1200):
        if (tmp_path / wait_for).exists():
            break
        time.sleep(0.05)
    return process


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "100000", "--checkpoint-dir", "ck")]
    process = start_training(tmp_path, argv, "ck/noteLearning_2.pth", stdout=subprocess.PIPE)
    try:
        process.send_signal(subprocess.signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Traceback" not in err
    last = max(int(name.split("_")[1].split(".")[0]) for name in os.listdir(tmp_path / "ck") if name.endswith(".pth"))
    assert f"last complete checkpoint: ck/noteLearning_{last}.pth" in err
    script = os.path.join(ROOT, "train.py")  # run from another folder: the hint names the script's path
    assert f"resume with: python {script} {' '.join(argv)} --resume ck/noteLearning_{last}.pth" in err
    checkpoints.load_checkpoint(str(tmp_path / "ck" / f"noteLearning_{last}.pth"))


def test_diverging_loss_stops_with_the_step_and_keeps_earlier_checkpoints(tmp_path, capsys):
    folder = tmp_path / "out"
    assert (
        run_main(
            train,
            tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--optimizer", "sgd", "--lr", "0.01"),
            capsys,
        )[0]
        == 0
    )
    before = (folder / "noteLearning_1.pth").read_bytes()
    resumed = os.path.abspath(folder / "noteLearning_1.pth")
    code, _, err = run_main(
        train,
        tiny_run(
            tmp_path,
            "--epochs",
            "3",
            "--checkpoint-dir",
            folder,
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--resume",
            resumed,
        ),
        capsys,
    )
    assert code == 0
    # the same run resumed with a huge --lr is refused as another setting; a fresh run diverges
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "bad", "--optimizer", "sgd", "--lr", "1e6"),
        capsys,
    )
    assert_usage_error(code, err, "non-finite at step", "smaller --lr")
    assert not (tmp_path / "bad").exists()  # the folder this failed run made is gone again
    assert (folder / "noteLearning_1.pth").read_bytes() == before


def test_a_divergence_in_the_last_update_of_an_epoch_saves_nothing(tmp_path, capsys):
    """One step an epoch: the loss is fine before the update; only the weights after it show the NaN."""
    code, out, err = run_main(
        train,
        tiny_run(
            tmp_path,
            "--epochs",
            "2",
            "--checkpoint-dir",
            tmp_path / "out",
            "--optimizer",
            "sgd",
            "--lr",
            "1e30",
            "--batch-size",
            "256",
        ),
        capsys,
    )
    assert_usage_error(code, err, "non-finite", "epoch 1", "nothing of it was saved")
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()
    assert not (tmp_path / "out" / "metrics.csv").exists()


def test_checkpoint_folder_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    code, _, err = run_main(train, tiny_run(tmp_path, "--checkpoint-dir", blocker / "sub"), capsys)
    assert_usage_error(code, err, "checkpoint folder")
    if os.geteuid() != 0:  # root writes anywhere; the read-only case needs an ordinary user
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        code, _, err = run_main(train, tiny_run(tmp_path, "--checkpoint-dir", readonly), capsys)
        assert_usage_error(code, err, "not writable")


def test_validation_split_is_held_out_from_training_and_reported(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    full, _ = data_files.load(str(root), download=False)
    train_part, val_part = mnist_mlp.split_validation(full, 56, seed=1)
    assert (len(train_part), len(val_part)) == (200, 56)
    rows = {tuple(row.tolist()) for row in full.pixels}
    assert len(rows) == 256  # every tiny image is distinct, so rows identify images
    train_rows = {tuple(row.tolist()) for row in train_part.pixels}
    val_rows = {tuple(row.tolist()) for row in val_part.pixels}
    assert not train_rows & val_rows and train_rows | val_rows == rows

    folder = tmp_path / "out"
    code, out, _ = run_main(
        train, tiny_run(tmp_path, "--epochs", "1", "--val-size", "56", "--checkpoint-dir", folder), capsys
    )
    assert code == 0 and "val accuracy" in out and "step" not in out.split("train loss")[0].split("\n", 1)[1]
    header, row = (folder / "metrics.csv").read_text().splitlines()
    assert header.split(",")[2:4] == ["val_loss", "val_accuracy"] and row.split(",")[3] != ""
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", root, "--json"], capsys)
    assert json.loads(out)["validation"]["total"] == 56
    assert_usage_error(
        *run_main(train, tiny_run(tmp_path, "--val-size", "256", "--checkpoint-dir", folder), capsys)[::2], "--val-size"
    )


def test_a_second_run_in_the_same_folder_is_refused_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)[0] == 0
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    code, _, err = run_main(
        train, tiny_run(tmp_path, "--epochs", "2", "--lr", "0.002", "--checkpoint-dir", folder), capsys
    )
    assert_usage_error(code, err, "already holds a run that reached epoch 3", "python evaluate.py", "--overwrite")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    code, out, _ = run_main(
        train, tiny_run(tmp_path, "--epochs", "2", "--lr", "0.002", "--checkpoint-dir", folder, "--overwrite"), capsys
    )
    assert code == 0
    assert (
        f"--overwrite: removed noteLearning_1.pth, noteLearning_2.pth, noteLearning_3.pth, metrics.csv from {folder}"
        in out
    )
    assert sorted(os.listdir(folder)) == ["metrics.csv", "noteLearning_1.pth", "noteLearning_2.pth"]
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert torch.load(folder / "noteLearning_2.pth", weights_only=True)["config"]["lr"] == 0.002
    assert_usage_error(
        *run_main(train, ["--resume", "", "--checkpoint-dir", folder], capsys)[::2], "--resume needs a checkpoint path"
    )


def test_resuming_refuses_later_checkpoints_of_another_continuation(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)[0] == 0
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_1.pth"),
        capsys,
    )
    assert_usage_error(code, err, "noteLearning_2.pth", "--overwrite")
    assert (
        run_main(
            train,
            tiny_run(
                tmp_path,
                "--epochs",
                "3",
                "--checkpoint-dir",
                folder,
                "--overwrite",
                "--resume",
                folder / "noteLearning_1.pth",
            ),
            capsys,
        )[0]
        == 0
    )
    assert [row.split(",")[0] for row in (folder / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


@pytest.mark.slow
def test_a_second_run_at_the_same_time_is_told_who_holds_the_folder(tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "100000", "--checkpoint-dir", "ck")]
    first = start_training(tmp_path, argv, "ck/noteLearning_1.pth", python=[sys.executable])  # its own pid is named
    try:
        second = subprocess.run(
            [*WARM_PYTHON, os.path.join(ROOT, "train.py"), *argv, "--overwrite"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "another train.py is writing to ck" in second.stderr
    assert first.returncode == 143  # SIGTERM: stopped between steps, as for Ctrl-C
    assert (tmp_path / "ck" / "noteLearning_1.pth").exists()


@pytest.mark.slow
def test_sigterm_stops_between_steps_and_says_how_to_resume(tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "100000", "--checkpoint-dir", "ck")]
    process = start_training(tmp_path, argv, "ck/noteLearning_2.pth")
    try:
        process.terminate()
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143 and "Traceback" not in err
    assert "stopped by SIGTERM during epoch" in err and "resume with: python " in err


@pytest.mark.parametrize("damage", ["bom", "semicolons", "latin1"])
def test_metrics_csv_is_never_rewritten_from_what_cannot_be_parsed(damage, tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder), capsys)[0] == 0
    path = folder / "metrics.csv"
    text = path.read_text()
    damaged = {
        "bom": b"\xef\xbb\xbf" + text.encode(),
        "semicolons": text.replace(",", ";").encode(),
        "latin1": text.encode() + "2,caf\xe9\n".encode("latin-1"),
    }[damage]
    path.write_bytes(damaged)
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_2.pth"),
        capsys,
    )
    if damage == "bom":  # Excel's byte-order mark is read, and every row kept
        assert code == 0
        assert [row.split(",")[0] for row in path.read_text().splitlines()[1:]] == ["1", "2", "3"]
    else:
        assert_usage_error(code, err, "metrics.csv")
        assert path.read_bytes() == damaged and not (folder / "noteLearning_3.pth").exists()


def test_a_stop_between_checkpoint_and_metrics_loses_no_row(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder), capsys)[0] == 0
    rows = (folder / "metrics.csv").read_text().splitlines()
    (folder / "metrics.csv").write_text("\n".join(rows[:2]) + "\n")  # as if killed before epoch 2's row
    assert (
        run_main(
            train,
            tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder, "--resume", folder / "noteLearning_2.pth"),
            capsys,
        )[0]
        == 0
    )
    new_rows = (folder / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in new_rows[1:]] == ["1", "2", "3"]
    assert new_rows[2].split(",")[:6] == rows[2].split(",")[:6]


def test_files_get_the_mode_the_umask_allows(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        root = make_tiny_mnist(tmp_path / "data", compress=True)
        folder = tmp_path / "out"
        assert (
            run_main(
                train,
                [
                    "--data-dir",
                    root,
                    "--device",
                    "cpu",
                    "--batch-size",
                    "32",
                    "--epochs",
                    "1",
                    "--checkpoint-dir",
                    folder,
                ],
                capsys,
            )[0]
            == 0
        )
        assert (
            run_main(
                evaluate,
                [folder / "noteLearning_1.pth", "--data-dir", root, "--save-errors", tmp_path / "errors.png"],
                capsys,
            )[0]
            == 0
        )
    finally:
        os.umask(old)
    for path in (
        folder / "noteLearning_1.pth",
        folder / "metrics.csv",
        tmp_path / "errors.png",
        root / "MNIST" / "raw" / "train-images-idx3-ubyte",
    ):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_resume_warns_without_rng_and_refuses_other_fused_or_thread_settings(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    for flags, words in ((["--fused"], "--fused"), (["--threads", "2"], "--threads")):
        if "--threads" in flags and (os.cpu_count() or 1) < 2:
            continue
        code, _, err = run_main(
            train,
            tiny_run(
                tmp_path, "--epochs", "2", "--checkpoint-dir", folder, *flags, "--resume", folder / "noteLearning_1.pth"
            ),
            capsys,
        )
        assert_usage_error(code, err, words, "other settings")
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True)
    del checkpoint["rng"]
    torch.save(checkpoint, tmp_path / "no-rng.pth")
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next", "--resume", tmp_path / "no-rng.pth"),
        capsys,
    )
    assert code == 0 and err.startswith("warning: ") and "random-generator state" in err


def test_a_failed_write_mid_run_is_one_error_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    real_save = checkpoints.save_checkpoint

    def save(path, checkpoint):
        if checkpoint["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(path, checkpoint)

    monkeypatch.setattr(checkpoints, "save_checkpoint", save)
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", tmp_path / "out"), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert lines[0].startswith("error: cannot write") and "No space left on device" in lines[0]
    assert lines[1].endswith("noteLearning_1.pth") and lines[2].startswith("resume with: python ")


@pytest.mark.slow
def test_output_into_a_closed_pipe_neither_crashes_nor_loses_checkpoints(trained, tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", "ck", "--log-interval", "1")]
    checkpoints = [str(trained[0] / name) for name in ("noteLearning_1.ck", "noteLearning_1.pth", "noteLearning_1.pth")]
    training, evaluating = run_at_once(
        *[
            dict(args=command, shell=True, cwd=tmp_path, capture_output=True, text=True)
            for command in (
                f"{shlex.join(WARM_PYTHON)} {shlex.quote(os.path.join(ROOT, 'train.py'))} {shlex.join(argv)} | head -1",
                f"{shlex.join(WARM_PYTHON)} {shlex.quote(os.path.join(ROOT, 'evaluate.py'))} {shlex.join(checkpoints)} "
                "--data-dir data --per-class --confusion | head -c 10",
            )
        ]
    )
    assert training.stdout.startswith("training with the") and "Traceback" not in training.stderr
    assert (tmp_path / "ck" / "noteLearning_3.pth").exists()
    assert "Traceback" not in evaluating.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--momentum", "-5"], ["--momentum"]),
        (["--momentum", "2"], ["--momentum"]),
        (["--seed", "18446744073709551616"], ["--seed"]),
        (["--hidden", "100000000000000000000", "64"], ["--hidden"]),
        (["--hidden", "128", "64", "32"], ["--hidden got 3 widths (128 64 32)", "takes 2", "edit of NoteModel"]),
        (["--hidden", "65536", "65536"], ["with 65536 65536", "GiB", "smaller widths"]),  # refused, not allocated
        (["--threads", "1000"], ["--threads"]),
        (["--lr", "abc"], ["--lr"]),
    ],
)
def test_out_of_range_flags_are_one_line_errors(argv, words, capsys):
    assert_usage_error(*run_main(train, argv, capsys)[::2], *words)


def test_the_lock_file_is_never_followed_through_a_symlink_nor_waited_on(tmp_path, capsys):
    """A .train.lock planted as a symlink must not get the target emptied and overwritten; a FIFO
    must not make train.py wait forever."""
    folder = tmp_path / "out"
    folder.mkdir()
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me\n")
    (folder / ".train.lock").symlink_to(precious)
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)
    assert_usage_error(code, err, "cannot lock", ".train.lock", "symbolic links")
    assert precious.read_text() == "keep me\n" and os.listdir(folder) == [".train.lock"]
    (folder / ".train.lock").unlink()
    os.mkfifo(folder / ".train.lock")
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)
    assert code == 0 or (code == 2 and "cannot lock" in err and err.count("\n") == 1)  # as filelock's version has it


def test_a_disk_that_fills_while_a_checkpoint_is_written_leaves_no_file_and_says_how_to_resume(
    tmp_path, monkeypatch, capsys
):
    from mnist_mlp_tools import safe_files

    real_write = safe_files.atomic_write

    def full_disk(path, write):
        if path.endswith("noteLearning_2.pth"):

            def write_some(file):
                file.write(b"PK")  # a few bytes reach the disk, then it is full
                raise OSError(28, "No space left on device")

            return real_write(path, write_some)
        return real_write(path, write)

    monkeypatch.setattr(safe_files, "atomic_write", full_disk)
    folder = tmp_path / "out"
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err and "No space left on device" in lines[0]
    assert lines[-1].startswith("resume with: python ") and lines[-1].endswith("noteLearning_1.pth")
    assert sorted(os.listdir(folder)) == ["metrics.csv", "noteLearning_1.pth"]  # no temp file, no lock


def test_a_divergence_right_after_a_resume_points_at_the_checkpoint(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True)
    checkpoint["model"]["fc3.weight"].mul_(1e36)  # finite, but the first logits overflow
    torch.save(checkpoint, tmp_path / "bad.pth")
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next", "--resume", tmp_path / "bad.pth"),
        capsys,
    )
    assert_usage_error(code, err, "non-finite", "resume from before", "bad.pth")
    assert "smaller --lr" not in err


@pytest.mark.slow
def test_two_ctrl_cs_at_any_gap_report_the_stop_once(tmp_path):
    """The second Ctrl-C may land while the first is being reported, during the clean-up after, or
    as the program exits: whatever the gap, one report, exit 130, no traceback (five runs at once)."""
    gaps = [0.0, 0.002, 0.005, 0.02, 0.1]
    processes = []
    for number, gap in enumerate(gaps):
        folder = tmp_path / f"run{number}"
        folder.mkdir()
        argv = [str(arg) for arg in tiny_run(folder, "--epochs", "100000", "--checkpoint-dir", "ck")]
        processes.append(
            (
                gap,
                subprocess.Popen(
                    [*WARM_PYTHON, os.path.join(ROOT, "train.py"), *argv],
                    cwd=folder,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
                folder,
            )
        )
    try:
        for gap, process, folder in processes:
            for _ in range(600):
                if (folder / "ck" / "noteLearning_2.pth").exists():
                    break
                time.sleep(0.05)
            process.send_signal(subprocess.signal.SIGINT)
            time.sleep(gap)
            process.send_signal(subprocess.signal.SIGINT)
        for gap, process, _ in processes:
            _, err = process.communicate(timeout=60)
            assert process.returncode == 130 and "Traceback" not in err, (gap, err)
            assert err.count("resume with:") == 1 and err.count("interrupted") == 1, (gap, err)
    finally:
        for _, process, _ in processes:
            process.kill()


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_is_printed_escaped_and_never_stops_a_command(tmp_path):
    """In a UTF-8 locale a name's stray bytes cannot be printed as they are: they are escaped (\\xff)."""
    make_tiny_mnist(tmp_path / "data")
    folder = os.path.join(os.fsencode(tmp_path), b"run-\xff")  # bytes: no str can name it portably
    environment = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": ""}
    script = (
        b"import sys, os; d = os.fsdecode; sys.path.insert(0, d(%r)); import train, evaluate, predict;"
        b"folder = d(%r);"
        b"code = train.main(['--epochs', '1', '--data-dir', d(%r), '--device', 'cpu', '--checkpoint-dir', folder]);"
        b"code += evaluate.main([os.path.join(folder, 'noteLearning_1.pth'), '--data-dir', d(%r)]);"
        b"code += predict.main([os.path.join(folder, 'noteLearning_1.pth'), d(%r)]);"
        b"print('codes', code)"
    ) % (
        os.fsencode(ROOT),
        folder,
        os.fsencode(tmp_path / "data"),
        os.fsencode(tmp_path / "data"),
        os.fsencode(os.path.join(ROOT, "data", "digits")),
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, env=environment, timeout=300)
    out, err = result.stdout.decode("utf-8"), result.stderr.decode("utf-8")  # valid UTF-8 throughout
    assert result.returncode == 0 and "Traceback" not in err, err[-2000:]
    assert "codes 0" in out and "run-\\xff" in out and os.path.exists(os.path.join(folder, b"noteLearning_1.pth"))


def test_an_output_name_as_long_as_the_filesystem_allows_is_written(tmp_path):
    from mnist_mlp_tools import safe_files

    path = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the longest name most filesystems take
    safe_files.atomic_write(str(path), lambda file: file.write(b"ok"))
    assert path.read_bytes() == b"ok" and os.listdir(tmp_path) == [path.name]


@pytest.mark.slow
def test_a_full_or_closed_stdout_neither_stops_training_nor_makes_a_traceback(trained, tmp_path):
    """train.py keeps training and saving with stdout on a full device or closed; evaluate.py and
    predict.py say in one line that they could not write (exit 1), or print nothing to a closed one."""
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", "ck")]
    checkpoint = str(trained[0] / "noteLearning_1.pth")
    with open("/dev/full", "w") as full:
        runs = [dict(args=[*WARM_PYTHON, os.path.join(ROOT, "train.py"), *argv], stdout=full)]
        for name, extra in (
            ("evaluate.py", ["--data-dir", "data"]),
            ("predict.py", [os.path.join(ROOT, "data", "digits")]),
        ):
            command = [*WARM_PYTHON, os.path.join(ROOT, name), checkpoint, *extra]
            runs += [
                dict(args=command, stdout=full),
                dict(args=command, stdout=subprocess.PIPE, preexec_fn=lambda: os.close(1)),
            ]
        trained_run, *reports = run_at_once(
            *[dict(run, cwd=tmp_path, stderr=subprocess.PIPE, text=True) for run in runs]
        )
    assert trained_run.returncode == 0 and "Traceback" not in trained_run.stderr
    assert trained_run.stderr.startswith("warning: cannot write to stdout") and trained_run.stderr.count("\n") == 1
    assert (tmp_path / "ck" / "noteLearning_2.pth").exists()
    for full, closed in (reports[:2], reports[2:]):  # evaluate.py's, then predict.py's
        assert full.returncode == 1 and full.stderr == "error: cannot write the output (No space left on device)\n"
        assert closed.returncode == 0 and closed.stderr == ""


def test_a_resume_into_a_folder_of_another_run_is_refused_unless_overwrite(tmp_path, capsys):
    """--resume A/noteLearning_2.pth --checkpoint-dir B, where B holds another run's epochs 1-2: refused,
    not mixed; with --overwrite, B holds the resumed run alone."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", a), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", b, "--seed", "2"), capsys)[0] == 0
    before = {name: (b / name).read_bytes() for name in os.listdir(b)}
    resume = ["--epochs", "3", "--resume", a / "noteLearning_2.pth", "--checkpoint-dir", b]
    code, _, err = run_main(train, tiny_run(tmp_path, *resume), capsys)
    assert_usage_error(code, err, "already holds another run", "noteLearning_1.pth", "--overwrite")
    assert {name: (b / name).read_bytes() for name in os.listdir(b)} == before
    assert run_main(train, tiny_run(tmp_path, *resume, "--overwrite"), capsys)[0] == 0
    runs = {torch.load(b / name, weights_only=True)["config"]["run"] for name in os.listdir(b) if name.endswith(".pth")}
    assert sorted(os.listdir(b)) == ["metrics.csv", "noteLearning_3.pth"] and len(runs) == 1
    rows = (b / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",run") and [row.split(",")[0] for row in rows[1:]] == ["3"]
    assert rows[1].split(",")[-1] == torch.load(a / "noteLearning_2.pth", weights_only=True)["config"]["run"]
    # resuming in its own folder keeps its own rows and checkpoints, as always
    assert (
        run_main(
            train,
            tiny_run(tmp_path, "--epochs", "3", "--resume", a / "noteLearning_2.pth", "--checkpoint-dir", a),
            capsys,
        )[0]
        == 0
    )
    assert [row.split(",")[0] for row in (a / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_small_messages_a_newcomer_meets(tmp_path, capsys):
    from mnist_mlp_tools import commands

    code, out, _ = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", tmp_path / "out"), capsys)
    assert code == 0 and "on cpu (1 thread)," in out.splitlines()[1]
    long = commands.error_text(ValueError("word " * 100), limit=30)
    assert long == "ValueError: word word word word word word …"  # cut at a word, and says so
    checkpoint = torch.load(tmp_path / "out" / "noteLearning_1.pth", weights_only=True)
    checkpoint["config"].update(val_size=10_000, seed=1)  # more than the tiny set's 256 images
    torch.save(checkpoint, tmp_path / "odd.pth")
    code, _, err = run_main(evaluate, [tmp_path / "odd.pth", "--data-dir", tmp_path / "data"], capsys)
    assert_usage_error(code, err, "holds out 10000 validation images", "training set has 256")
    assert "--val-size" not in err  # evaluate.py has no such flag


@pytest.mark.slow
def test_predict_into_a_closed_pipe_exits_quietly(trained, tmp_path):
    folder = os.path.join(ROOT, "data", "digits")
    command = (
        f"{shlex.join(WARM_PYTHON)} {shlex.quote(os.path.join(ROOT, 'predict.py'))} "
        f"{shlex.quote(str(trained[0] / 'noteLearning_1.pth'))} "
        + " ".join([shlex.quote(folder)] * 150)
        + ' | head -1; echo "exit ${PIPESTATUS[0]}"'
    )
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "exit 141" and result.stderr == ""


def test_a_caller_sees_each_epochs_step_losses_through_on_epoch(tmp_path, capsys):
    """study.py takes the step losses from train.main's on_epoch, not from the printed log."""
    seen = []
    code = train.main(
        [str(arg) for arg in tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "out")],
        on_epoch=lambda epoch, result: seen.append((epoch, result.step_losses.tolist(), result.mean_loss)),
    )
    printed = capsys.readouterr().out
    assert code == 0 and [epoch for epoch, _, _ in seen] == [1, 2] and all(len(losses) == 8 for _, losses, _ in seen)
    assert f"epoch 2/2  train loss {seen[1][2]:.4f}" in printed  # the epoch's mean, as printed


FLAG_WORDS = [
    "--epochs",
    "--batch-size",
    "--lr",
    "--optimizer",
    "--momentum",
    "--weight-decay",
    "--inputs",
    "--hidden",
    "--seed",
    "--dataset",
    "--val-size",
    "--resume",
    "--device",
    "--threads",
    "--step",
    "--fused",
    "--epohcs",
    "-x",
    "--",
    "--lr=",
    "--hidden=",
]
VALUE_WORDS = st.one_of(
    st.sampled_from(
        [
            "0",
            "1",
            "-1",
            "1e-3",
            "nan",
            "inf",
            "1e400",
            "adam",
            "sgd",
            "cuda",
            "٣",
            "３",
            "",
            " ",
            "2" * 30,
            "0.9999999",
            "x.pth",
        ]
    ),
    st.text(max_size=6),
)


@settings(max_examples=150, deadline=None)
@given(argv=st.lists(st.one_of(st.sampled_from(FLAG_WORDS), VALUE_WORDS), max_size=6))
def test_any_command_line_is_parsed_or_refused_in_one_line(argv):
    """The flags' rule, on generated command lines: parsed into their types and ranges, or one UsageError,
    printed as one line (argparse's own exit never escapes, whatever the words; a newline in a word is
    escaped as the edge prints it)."""
    try:
        args = train.parse_args(argv)
    except commands.UsageError as error:
        assert "\n" not in commands.printable(str(error))
        return
    assert 1 <= args.epochs and 0 < args.lr < float("inf") and 0 <= args.momentum < 1
    assert args.hidden is None or all(1 <= width <= commands.MAX_WIDTH for width in args.hidden)
