"""Shared fixtures and helpers of the tests (python -m pytest -q): tiny datasets, one trained epoch,
calling a script's main in-process, checking one-line errors, and the models a student edits into."""

import gzip
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

import draw
import mnist_mlp
import train
from mnist_mlp_tools import commands, data_files, fast_step
from tests import warm_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


TUTORIAL_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


def write_idx(path, tensor):
    """Write a uint8 tensor as an IDX file, the format torchvision's MNIST reader parses."""
    header = struct.pack(f">I{tensor.dim()}I", 0x800 + tensor.dim(), *tensor.shape)
    with open(path, "wb") as file:
        file.write(header + tensor.contiguous().numpy().tobytes())


def make_tiny_mnist(root, n_train=256, n_test=64, seed=0, compress=False):
    """A small learnable MNIST look-alike: each class is a bright bar at its own rows, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    folder = os.path.join(root, "MNIST", "raw")
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.arange(n) % 10
        images = torch.randint(0, 60, (n, 28, 28), generator=generator)
        for index, label in enumerate(labels.tolist()):
            images[index, 2 + 2 * label : 4 + 2 * label, 4:24] = 255
        for kind, tensor in (("images-idx3", images), ("labels-idx1", labels)):
            path = os.path.join(folder, f"{prefix}-{kind}-ubyte")
            write_idx(path, tensor.to(torch.uint8))
            if compress:
                with open(path, "rb") as raw, gzip.open(path + ".gz", "wb") as packed:
                    packed.write(raw.read())
                os.remove(path)
    return root


@pytest.fixture(scope="session")
def mnist():
    """The bundled real MNIST, as (train Split, test Split)."""
    return data_files.load(commands.DEFAULT_DATA_DIR, download=False)


@pytest.fixture
def one_thread():
    """torch on one thread, as train.py runs by default (the flush of denormals is per thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One epoch of `python train.py` on the bundled MNIST: (checkpoint folder, printed output)."""
    folder = tmp_path_factory.mktemp("trained")
    output = io.StringIO()
    with redirect_stdout(output):
        code = train.main(["--epochs", "1", "--checkpoint-dir", str(folder), "--device", "cpu"])
    assert code == 0
    return folder, output.getvalue()


@pytest.fixture(scope="session", autouse=True)
def torch_on_one_thread():
    """The tests' own torch work on one thread, as train.py's: the other core is left to the programs the
    tests start (on two cores, a second intra-op thread only spins against them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


WARM_SERVER = os.path.join(ROOT, "tests", "warm_python.py")
CAN_FORK_WARM = all(hasattr(os, name) for name in ("fork", "pidfd_open")) and hasattr(socket, "send_fds")
# `python` for the project's own scripts, torch already imported (tests/warm_python.py); plain Python elsewhere
WARM_PYTHON = [sys.executable, "-S", WARM_SERVER] if CAN_FORK_WARM else [sys.executable]
WARM = pytest.StashKey[tuple]()  # the server's process, its folder, the variable's value before


def pytest_sessionstart(session):
    """Start the server WARM_PYTHON's clients are forked from before the tests are even collected: it
    imports torch meanwhile."""
    if not CAN_FORK_WARM:
        return
    folder = tempfile.mkdtemp(prefix="mnist-mlp-warm-")
    address = os.path.join(folder, "python.sock")
    server = subprocess.Popen(
        [sys.executable, WARM_SERVER, "--serve", address], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    session.config.stash[WARM] = (server, folder, os.environ.get(warm_python.ADDRESS_VARIABLE))
    os.environ[warm_python.ADDRESS_VARIABLE] = address  # inherited by every process the tests start


def pytest_sessionfinish(session):
    if WARM not in session.config.stash:
        return
    server, folder, before = session.config.stash[WARM]
    if before is None:
        del os.environ[warm_python.ADDRESS_VARIABLE]
    else:
        os.environ[warm_python.ADDRESS_VARIABLE] = before
    server.kill()
    server.wait()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def slow_programs_started_first(request):
    """The session fixtures named started_* start programs that a test only waits for (the notebooks'
    kernels) and return at once. Asked for here, before the first test, when a chosen test uses one,
    they run on the second core while the tests in this process use the first."""
    names = {name for item in request.session.items for name in item.fixturenames if name.startswith("started_")}
    for name in sorted(names):
        request.getfixturevalue(name)


NOTEBOOKS = [os.path.join(ROOT, "notebooks", name) for name in ("lesson.ipynb", "lesson.zh-CN.ipynb")]
NOTEBOOK_RUNNER = """
import sys, nbclient, nbformat
notebook = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[2]}}).execute()
nbformat.write(notebook, sys.argv[3])
"""


@pytest.fixture(scope="session")
def started_notebooks(tmp_path_factory):
    """Both lesson notebooks running top to bottom, each in a fresh kernel of its own (one torch thread
    each): [(notebook, the executed copy it writes, its runner's Popen)]."""
    folder = tmp_path_factory.mktemp("notebooks")
    runs = [(path, folder / os.path.basename(path)) for path in NOTEBOOKS]
    started = [
        (
            path,
            out,
            subprocess.Popen(
                [sys.executable, "-c", NOTEBOOK_RUNNER, path, os.path.dirname(path), str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for path, out in runs
    ]
    yield started
    for _, _, process in started:
        process.kill()
        process.communicate()


def run_at_once(*runs, timeout=300):
    """subprocess.run(**run) for each run (a dict of its arguments), all started together, since each
    new Python spends ~3 s of one core importing torch: the CompletedProcess of each, in order."""
    started = []
    for run in runs:
        run = dict(run)
        if run.pop("capture_output", False):
            run.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append((run["args"], subprocess.Popen(**run)))
    try:
        outputs = [process.communicate(timeout=timeout) for _, process in started]
        return [
            subprocess.CompletedProcess(args, process.returncode, *output)
            for (args, process), output in zip(started, outputs)
        ]
    finally:
        for _, process in started:
            process.kill()


@pytest.fixture(scope="session")
def server(trained):
    """draw.py's server on a free port, serving the one-epoch checkpoint: its (host, port)."""
    httpd = draw.Server(("127.0.0.1", 0), draw.DigitReader(str(trained[0] / "noteLearning_1.pth")))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address
    httpd.shutdown()
    httpd.server_close()


def run_main(module, argv, capsys):
    """Call a script's main in-process: (exit code, stdout, stderr)."""
    code = module.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


class SigmoidModel(mnist_mlp.NoteModel):
    """NoteModel as a student edits it first: sigmoid instead of ReLU."""

    def forward(self, x):
        x = x.view(-1, 784)
        x = torch.sigmoid(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        return self.fc3(x)


class DropoutModel(mnist_mlp.NoteModel):
    """NoteModel with an added nn.Dropout between the layers."""

    def __init__(self, hidden1=128, hidden2=64):
        super().__init__(hidden1, hidden2)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = x.view(-1, 784)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


class DeeperModel(nn.Module):
    """Four Linear layers with ReLU between: another depth, as a student edits NoteModel into."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4 = (
            nn.Linear(784, 50),
            nn.Linear(50, 40),
            nn.Linear(40, 30),
            nn.Linear(30, 10),
        )

    def forward(self, x):
        x = F.relu(self.fc1(x.view(-1, 784)))
        x = F.relu(self.fc2(x))
        return self.fc4(F.relu(self.fc3(x)))


def make_step(model, choice="auto", optimizer="adam", lr=0.001, batch_sizes=(64,)):
    """(step, description) as train.py makes them for `model`."""
    settings = {"optimizer": optimizer, "lr": lr, "momentum": 0.9}
    step, _, description = fast_step.make_training(model, nn.CrossEntropyLoss(), settings, choice, batch_sizes)
    return step, description


def tiny_run(tmp_path, *extra):
    """train.py flags for a quick run on a tiny IDX dataset in tmp_path/data."""
    root = tmp_path / "data"
    if not root.exists():
        make_tiny_mnist(root)
    return ["--data-dir", root, "--device", "cpu", "--batch-size", "32", *extra]


def pytest_collection_modifyitems(items):
    """Mark the browser tests (those that draw on the page) and the CUDA tests, by what they use."""
    for item in items:
        if "page" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)
        if item.module.__name__ == "test_cuda":
            item.add_marker(pytest.mark.cuda)
