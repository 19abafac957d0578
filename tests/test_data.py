"""The data files: the bundled .gz copies decompressed once, damaged or odd files refused in one line,
missing data named with the folder and the flag."""

import gzip
import os

import pytest
import torch
from torchvision import datasets

import evaluate
import mnist_mlp
import train
from mnist_mlp_tools import commands, data_files
from tests.conftest import assert_usage_error, make_tiny_mnist, run_main, tiny_run


def test_gz_files_are_decompressed_atomically_and_read_by_torchvision(tmp_path):
    root = make_tiny_mnist(tmp_path, compress=True)
    train_split, test_split = data_files.load(str(root), download=False)
    assert (len(train_split), len(test_split)) == (256, 64)
    raw = sorted(os.listdir(tmp_path / "MNIST" / "raw"))
    assert [name for name in raw if not name.endswith(".gz")] == sorted(mnist_mlp.RAW_FILES)


def test_missing_data_names_the_files_and_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.MNIST, "mirrors", [])  # no network in tests: the download fails at once
    code, _, err = run_main(
        train, ["--data-dir", tmp_path / "nothing", "--checkpoint-dir", tmp_path / "out", "--device", "cpu"], capsys
    )
    assert_usage_error(
        code,
        err,
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "--data-dir",
        str(tmp_path / "nothing" / "MNIST" / "raw"),
    )
    assert not (tmp_path / "out").exists() and not (tmp_path / "nothing").exists()  # no empty folders left


def test_unreadable_data_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("hello")
    code, _, err = run_main(train, ["--data-dir", not_a_folder, "--checkpoint-dir", tmp_path], capsys)
    assert_usage_error(code, err, "data folder")


def write_raw(root, name, data):
    folder = root / "MNIST" / "raw"
    (folder / name).write_bytes(data)


@pytest.mark.parametrize(
    "damage, words",
    [
        ("truncated", ["train-images-idx3-ubyte", "truncated"]),
        ("magic", ["train-labels-idx1-ubyte", "magic"]),
        ("gz", ["cannot decompress", "t10k-images-idx3-ubyte.gz"]),
    ],
)
def test_damaged_data_files_are_one_line_errors(damage, words, tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    raw = root / "MNIST" / "raw"
    if damage == "truncated":
        data = (raw / "train-images-idx3-ubyte").read_bytes()
        write_raw(root, "train-images-idx3-ubyte", data[:1000])
    elif damage == "magic":
        data = (raw / "train-labels-idx1-ubyte").read_bytes()
        write_raw(root, "train-labels-idx1-ubyte", b"\x00\x00\x08\x03" + data[4:])
    else:
        os.remove(raw / "t10k-images-idx3-ubyte")
        write_raw(root, "t10k-images-idx3-ubyte.gz", b"\x1f\x8b\x08\x00 not really gzip")
    code, _, err = run_main(
        train, ["--data-dir", root, "--checkpoint-dir", tmp_path / "out", "--device", "cpu"], capsys
    )
    assert_usage_error(code, err, *words)
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()
    assert not (raw / "t10k-images-idx3-ubyte").exists() or damage != "gz"


def test_fashion_mnist_from_local_gz_files(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data", compress=True)
    os.rename(root / "MNIST", root / "FashionMNIST")
    folder = tmp_path / "out"
    code, out, _ = run_main(
        train,
        [
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            root,
            "--epochs",
            "1",
            "--checkpoint-dir",
            folder,
            "--device",
            "cpu",
            "--batch-size",
            "32",
        ],
        capsys,
    )
    assert code == 0 and "fashion-mnist" in out
    assert torch.load(folder / "noteLearning_1.pth", weights_only=True)["config"]["dataset"] == "fashion-mnist"
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", root, "--per-class"], capsys)
    assert code == 0 and "fashion-mnist test set" in out and "Ankle boot" in out


def test_stale_torchvision_cache_files_cannot_replace_the_raw_files(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    processed = root / "MNIST" / "processed"
    processed.mkdir()
    fake = (torch.zeros(100, 28, 28, dtype=torch.uint8), torch.zeros(100, dtype=torch.long))
    torch.save(fake, processed / "training.pt")
    torch.save(fake, processed / "test.pt")
    train_split, test_split = data_files.load(str(root), download=False)
    assert (len(train_split), len(test_split)) == (256, 64)
    (processed / "training.pt").write_bytes(b"garbage")
    assert len(data_files.load(str(root), download=False)[0]) == 256


def test_an_empty_gz_is_an_error_and_a_fixed_one_heals(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data", compress=True)
    raw = root / "MNIST" / "raw"
    good = (raw / "t10k-labels-idx1-ubyte.gz").read_bytes()
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb"):
        pass
    with pytest.raises(commands.UsageError, match="t10k-labels-idx1-ubyte.gz"):
        data_files.load(str(root), download=False)
    assert not (raw / "t10k-labels-idx1-ubyte").exists()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(good)
    assert len(data_files.load(str(root), download=False)[1]) == 64


def test_a_fifo_is_refused_not_waited_on(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    os.remove(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    os.mkfifo(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(commands.UsageError, match="not a regular file"):
        data_files.load(str(root), download=False)
    folder = tmp_path / "out"
    folder.mkdir()
    os.mkfifo(folder / "metrics.csv")
    code, _, err = run_main(train, tiny_run(tmp_path / "other", "--checkpoint-dir", folder, "--epochs", "1"), capsys)
    assert_usage_error(code, err, "metrics.csv")
    os.mkfifo(tmp_path / "fifo.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "fifo.pth"], capsys)[::2], "not a regular file")
    assert_usage_error(*run_main(evaluate, ["/dev/zero"], capsys)[::2], "not a regular file")


def test_a_dataset_file_with_no_images_or_an_absurd_header_is_one_line_and_writes_nothing(tmp_path, capsys):
    import struct

    root = make_tiny_mnist(tmp_path / "data")
    raw = root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte").write_bytes(struct.pack(">4I", 0x803, 0, 28, 28))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">2I", 0x801, 0))
    code, _, err = run_main(train, tiny_run(tmp_path, "--checkpoint-dir", tmp_path / "out"), capsys)
    assert_usage_error(code, err, "N > 0 images")
    # a 2.6 GB promise in a small .gz: refused from the header, before anything is decompressed
    os.remove(raw / "t10k-images-idx3-ubyte")
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as packed:
        packed.write(struct.pack(">4I", 0x803, 3_300_000, 28, 28) + bytes(1 << 20))
    with pytest.raises(commands.UsageError, match="claims 3,300,000 items"):
        data_files.load(str(root), download=False)
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    assert [name for name in os.listdir(raw) if name.endswith(".tmp")] == []


@pytest.mark.parametrize("how", ["not writable", "read-only filesystem"])
def test_a_read_only_install_reads_the_gz_files_and_tutorial_py_says_what_to_do(how, tmp_path, capsys, monkeypatch):
    """The repository on a read-only mount (or a folder root cannot write either): nothing is
    decompressed, train.py and evaluate.py read the .gz directly, and tutorial.py (torchvision reads only
    decompressed files) says in one line to pass --data-dir to a writable copy."""
    import errno

    import tutorial
    from mnist_mlp_tools import safe_files

    root = make_tiny_mnist(tmp_path / "data", compress=True)
    raw = os.path.join(root, "MNIST", "raw")
    real_write = safe_files.atomic_write
    refusal = (errno.EACCES, "Permission denied") if how == "not writable" else (errno.EROFS, "Read-only file system")

    def read_only(path, write):  # the data's folder cannot be written (root could: simulated); the checkpoints' can
        if os.path.dirname(os.path.abspath(path)) == raw:
            raise OSError(*refusal)
        return real_write(path, write)

    monkeypatch.setattr(safe_files, "atomic_write", read_only)
    before = sorted(os.listdir(raw))
    code, out, err = run_main(
        train,
        [
            "--data-dir",
            root,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--checkpoint-dir",
            tmp_path / "out",
        ],
        capsys,
    )
    assert code == 0 and err == "" and "256 mnist images" in out
    assert sorted(os.listdir(raw)) == before and all(name.endswith(".gz") for name in before)
    assert run_main(evaluate, [tmp_path / "out" / "noteLearning_1.pth", "--data-dir", root], capsys)[0] == 0
    assert_usage_error(
        *run_main(tutorial, ["--data-dir", root, "--epochs", "1", "--checkpoint-dir", tmp_path / "t"], capsys)[::2],
        "torchvision reads the data decompressed",
        "--data-dir",
    )
