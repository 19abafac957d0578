"""Tests for mnist_mlp, train.py and evaluate.py: python -m pytest -q"""

import contextlib
import dataclasses
import gzip
import inspect
import json
import math
import os
import shlex
import struct
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets, transforms

import evaluate
import mnist_mlp
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TUTORIAL_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])


class TutorialNet(nn.Module):
    """The blog tutorial's model, as it writes it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.fc2 = nn.Linear(128, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x):
        x = x.view(-1, 28 * 28)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


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
            images[index, 2 + 2 * label:4 + 2 * label, 4:24] = 255
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
    return mnist_mlp.load_dataset(mnist_mlp.DEFAULT_DATA_DIR, download=False)


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
    import io
    from contextlib import redirect_stdout
    output = io.StringIO()
    with redirect_stdout(output):
        code = train.main(["--epochs", "1", "--checkpoint-dir", str(folder), "--device", "cpu"])
    assert code == 0
    return folder, output.getvalue()


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


# ----------------------------------------------------------------------------- model and data

def test_model_matches_the_tutorials_keys_and_shapes():
    ours, tutorial = mnist_mlp.NoteModel(), TutorialNet()
    assert [(key, value.shape) for key, value in ours.state_dict().items()] == \
           [(key, value.shape) for key, value in tutorial.state_dict().items()]
    ours.load_state_dict(tutorial.state_dict())
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(ours(x), tutorial(x))
    assert torch.equal(ours(x.view(5, 784)), ours(x))
    deeper = mnist_mlp.NoteModel([32, 16, 8])
    assert [name for name, _ in deeper.named_children()] == ["fc1", "fc2", "fc3", "fc4"]
    assert deeper(x).shape == (5, 10)
    assert mnist_mlp.checked_checkpoint("deeper", deeper.state_dict())["config"]["hidden"] == [32, 16, 8]


def test_normalization_equals_torchvision_transforms_bit_for_bit(mnist):
    train_split, _ = mnist
    dataset = datasets.MNIST(mnist_mlp.DEFAULT_DATA_DIR, train=True, transform=TUTORIAL_TRANSFORM)
    indices = list(range(0, 60000, 97))
    expected = torch.stack([dataset[i][0] for i in indices]).view(-1, 784)
    ours = mnist_mlp.normalize(train_split.pixels[indices])
    assert ours.dtype == torch.float32
    assert torch.equal(ours, expected)
    assert torch.equal(train_split.labels[indices], torch.tensor([dataset[i][1] for i in indices]))


def test_one_epoch_visits_every_training_index_once_in_batches_of_64_then_32():
    order = mnist_mlp.epoch_order(60000, torch.Generator().manual_seed(1))
    batches = order.split(64)
    assert [len(batch) for batch in batches] == [64] * 937 + [32]
    assert torch.equal(torch.cat(batches).sort().values, torch.arange(60000))
    assert not torch.equal(order, mnist_mlp.epoch_order(60000, torch.Generator().manual_seed(1)).flip(0))


def test_batch_order_equals_the_dataloaders_over_two_epochs():
    generator, ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loader = torch.utils.data.DataLoader(list(range(60000)), batch_size=64, shuffle=True, generator=generator)
    for _ in range(2):
        expected = torch.cat(list(loader))
        assert torch.equal(mnist_mlp.epoch_order(60000, ours), expected)


def test_our_batches_equal_the_tutorials_dataloader_batches(tmp_path):
    root = make_tiny_mnist(tmp_path, n_train=200)
    train_split, _ = mnist_mlp.load_dataset(str(root), download=False)
    dataset = datasets.MNIST(str(root), train=True, transform=TUTORIAL_TRANSFORM)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    ours = torch.Generator().manual_seed(3)
    for _ in range(2):
        order = mnist_mlp.epoch_order(len(train_split), ours)
        their_batches = list(loader)
        assert [len(y) for _, y in their_batches] == [64, 64, 64, 8]
        for batch, (x, y) in zip(order.split(64), their_batches):
            assert torch.equal(mnist_mlp.normalize(train_split.pixels[batch]), x.view(-1, 784))
            assert torch.equal(train_split.labels[batch], y)


def test_gz_files_are_decompressed_atomically_and_read_by_torchvision(tmp_path):
    root = make_tiny_mnist(tmp_path, compress=True)
    train_split, test_split = mnist_mlp.load_dataset(str(root), download=False)
    assert (len(train_split), len(test_split)) == (256, 64)
    raw = sorted(os.listdir(tmp_path / "MNIST" / "raw"))
    assert [name for name in raw if not name.endswith(".gz")] == sorted(mnist_mlp.RAW_FILES)


def test_bundled_data_has_the_canonical_mnist_checksums():
    import hashlib
    expected = {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
                "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
                "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
                "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}
    for name, md5 in expected.items():
        with gzip.open(os.path.join(HERE, "data", "MNIST", "raw", name + ".gz"), "rb") as file:
            assert hashlib.md5(file.read()).hexdigest() == md5, name


# ----------------------------------------------------------------------------- training step

def test_hand_written_backward_equals_autograd_bit_for_bit(mnist):
    train_split, _ = mnist
    x, labels = mnist_mlp.normalize(train_split.pixels[:64]), train_split.labels[:64]
    for hidden in ([128, 64], [50, 40, 30]):
        torch.manual_seed(0)
        reference = mnist_mlp.NoteModel(hidden)
        F.cross_entropy(reference(x), labels).backward()
        torch.manual_seed(0)
        model = mnist_mlp.NoteModel(hidden)

        layers = list(model.children())
        grads = [(torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)) for layer in layers]
        loss, _ = mnist_mlp.FastStep(layers).forward_backward(x, labels, grads)
        assert torch.equal(loss, F.cross_entropy(reference(x), labels))
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            ours.grad = grads[int(name[2]) - 1][name.endswith("bias")]
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(ours.grad, theirs.grad), (hidden, name)


@pytest.mark.parametrize("optimizer, fused", [("adam", False), ("adam", True), ("sgd", True)])
def test_our_loop_equals_the_tutorials_pipeline_bit_for_bit(mnist, optimizer, fused):
    """40 steps of DataLoader + transforms + autograd vs ours, from the same seed: same weights."""
    steps, seed = 40, 5
    torch.manual_seed(seed)
    tutorial = TutorialNet()
    tutorial_optimizer = mnist_mlp.make_optimizer(optimizer, tutorial.parameters(), 0.01, fused=fused)
    dataset = datasets.MNIST(mnist_mlp.DEFAULT_DATA_DIR, train=True, transform=TUTORIAL_TRANSFORM)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    criterion = nn.CrossEntropyLoss()
    for step, (images, labels) in zip(range(steps), loader):
        tutorial_optimizer.zero_grad()
        criterion(tutorial(images), labels).backward()
        tutorial_optimizer.step()

    torch.manual_seed(seed)
    model = mnist_mlp.NoteModel()
    train_split, _ = mnist
    step, _ = mnist_mlp.make_train_step(model, nn.CrossEntropyLoss(),
                                        mnist_mlp.make_optimizer(optimizer, model.parameters(), 0.01, fused=fused))
    assert isinstance(step, mnist_mlp.FastStep)
    order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(seed))
    for batch in order.split(64)[:steps]:
        step(mnist_mlp.normalize(train_split.pixels[batch]), train_split.labels[batch])
    for ours, theirs in zip(model.parameters(), tutorial.parameters()):
        assert torch.equal(ours, theirs)


def test_adam_by_hand_with_bias_correction_equals_torch_adam():
    torch.manual_seed(0)
    param = torch.randn(100)
    reference = nn.Parameter(param.clone())
    optimizer = torch.optim.Adam([reference], lr=1e-3, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros(100), torch.zeros(100)
    for step in range(1, 11):
        grad = torch.randn(100)
        reference.grad = grad.clone()
        optimizer.step()
        mnist_mlp.adam_update(param, grad, exp_avg, exp_avg_sq, step)
        torch.testing.assert_close(param, reference.detach(), rtol=0, atol=1e-7)


def adam_step_sizes(steps, bias_correction, lr=1e-3):
    """The size of each of `steps` Adam steps for a constant gradient, as multiples of lr."""
    param, grad = torch.zeros(1, dtype=torch.float64), torch.full((1,), 0.37, dtype=torch.float64)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    sizes = []
    for step in range(1, steps + 1):
        before = param.clone()
        mnist_mlp.adam_update(param, grad, exp_avg, exp_avg_sq, step, lr=lr, bias_correction=bias_correction)
        sizes.append(float((before - param).abs()) / lr)
    return sizes


def test_without_bias_correction_the_early_steps_are_too_large_not_too_small():
    corrected, uncorrected = adam_step_sizes(1000, True), adam_step_sizes(1000, False)
    assert corrected[0] == pytest.approx(1.0, rel=1e-3)  # with the correction the first step is lr
    assert uncorrected[0] == pytest.approx(3.162, rel=1e-3)  # 0.1 / sqrt(0.001)
    for t, expected in ((10, 6.5), (100, 3.2), (1000, 1.26)):
        exact = (1 - 0.9 ** t) / math.sqrt(1 - 0.999 ** t)  # m_t / sqrt(v_t) for a constant gradient
        assert uncorrected[t - 1] == pytest.approx(exact, rel=1e-6)
        assert uncorrected[t - 1] == pytest.approx(expected, abs=0.05)
        assert corrected[t - 1] == pytest.approx(1.0, rel=1e-4)


def test_adam_by_hand_optimizer_equals_torch_adam_and_can_drop_the_correction():
    torch.manual_seed(0)
    models = [mnist_mlp.NoteModel([16]) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    optimizers = [torch.optim.Adam(models[0].parameters(), lr=1e-3, foreach=False),
                  mnist_mlp.make_optimizer("adam-no-bias-correction", models[1].parameters(), 1e-3),
                  mnist_mlp.AdamByHand(models[2].parameters(), lr=1e-3)]
    x, labels = torch.randn(32, 784), torch.randint(0, 10, (32,))
    for _ in range(5):
        for model, optimizer in zip(models, optimizers):
            mnist_mlp.textbook_step(model, nn.CrossEntropyLoss(), optimizer, x, labels)
    for a, c in zip(models[0].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert mnist_mlp.optimizer_config(optimizers[1])["optimizer"] == "adam-no-bias-correction"
    assert set(optimizers[1].state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    moved = [float((b - a).detach().abs().max()) for a, b in zip(models[0].parameters(), models[1].parameters())]
    assert max(moved) > 1e-3  # the uncorrected run went elsewhere: its early steps were larger


def test_same_seed_twice_gives_identical_weights(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    states = []
    for run in ("a", "b"):
        code, _, _ = run_main(train, ["--epochs", "2", "--data-dir", root, "--checkpoint-dir", tmp_path / run,
                                      "--device", "cpu", "--seed", "3"], capsys)
        assert code == 0
        states.append(torch.load(tmp_path / run / "noteLearning_2.pth", weights_only=True)["model"])
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


class SigmoidModel(mnist_mlp.NoteModel):
    """NoteModel as a student edits it first: sigmoid instead of ReLU."""

    def forward(self, x):
        x = x.view(-1, 784)
        x = torch.sigmoid(self.fc1(x))
        x = torch.sigmoid(self.fc2(x))
        return self.fc3(x)


class DropoutModel(mnist_mlp.NoteModel):
    """NoteModel with an added nn.Dropout between the layers."""

    def __init__(self, hidden=(128, 64)):
        super().__init__(hidden)
        self.dropout = nn.Dropout(0.2)

    def forward(self, x):
        x = x.view(-1, 784)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x)


def test_normalize_equals_the_three_step_form_for_every_byte_value():
    every_byte = torch.arange(256, dtype=torch.uint8)
    textbook = every_byte.float().div(255).sub(0.5).div(0.5)  # ToTensor, then Normalize((0.5,), (0.5,))
    assert torch.equal(mnist_mlp.normalize(every_byte), textbook)
    shifted = torch.cat([every_byte.roll(k) for k in range(40)]).view(-1, 64)  # vector and tail code paths
    assert torch.equal(mnist_mlp.normalize(shifted), shifted.float().div(255).sub(0.5).div(0.5))


def make_step(model, choice="auto", optimizer="adam", lr=0.001):
    return mnist_mlp.make_train_step(model, nn.CrossEntropyLoss(),
                                     mnist_mlp.make_optimizer(optimizer, model.parameters(), lr), choice)


def test_the_plain_model_takes_the_fast_step_and_edited_models_the_autograd_step():
    step, description = make_step(mnist_mlp.NoteModel())
    assert isinstance(step, mnist_mlp.FastStep) and description.startswith("fast step")
    for model, words in ((SigmoidModel(), "computes something other"), (DropoutModel(), "Dropout"),
                         (mnist_mlp.NoteModel([32, 16, 8]), None)):
        step, description = make_step(model)
        if words is None:
            assert isinstance(step, mnist_mlp.FastStep)
        else:
            assert not isinstance(step, mnist_mlp.FastStep) and description.startswith("autograd step") \
                and words in description, description
    hooked = mnist_mlp.NoteModel()
    hooked.fc2.register_forward_hook(lambda module, inputs, output: None)
    assert "hooks" in make_step(hooked)[1]
    assert "as asked" in make_step(mnist_mlp.NoteModel(), "autograd")[1]
    with pytest.raises(mnist_mlp.UsageError, match="--step fast cannot train this model exactly"):
        make_step(SigmoidModel(), "fast")
    loss_with_smoothing = mnist_mlp.make_train_step(mnist_mlp.NoteModel(), nn.CrossEntropyLoss(label_smoothing=0.1),
                                                    torch.optim.SGD(mnist_mlp.NoteModel().parameters(), lr=0.1))
    assert "nn.CrossEntropyLoss()" in loss_with_smoothing[1]


def test_the_fast_step_check_leaves_no_trace():
    class FunctionalDropout(mnist_mlp.NoteModel):  # no module to see: only the probe can tell
        def forward(self, x):
            return self.fc3(F.dropout(F.relu(self.fc2(F.relu(self.fc1(x.view(-1, 784))))), 0.5, self.training))

    model, plain = FunctionalDropout(), mnist_mlp.NoteModel()
    before = torch.get_rng_state()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert "computes something other" in mnist_mlp.fast_step_problem(model, nn.CrossEntropyLoss(), 64)
    assert mnist_mlp.fast_step_problem(model.eval(), nn.CrossEntropyLoss(), 64) is None  # no dropout in eval mode
    assert mnist_mlp.fast_step_problem(plain, nn.CrossEntropyLoss(), 64) is None
    assert all(parameter.grad is None for parameter in plain.parameters())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fast_and_autograd_steps_give_bit_identical_weights(mnist, optimizer):
    train_split, _ = mnist
    models = []
    for choice in ("fast", "autograd"):
        torch.manual_seed(4)
        model = mnist_mlp.NoteModel()
        step, _ = make_step(model, choice, optimizer, lr=0.01)
        order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(4))
        result = mnist_mlp.train_epoch(step, train_split, order[:40 * 64], 64)
        models.append((model, result.step_losses))
    (fast, fast_losses), (autograd, autograd_losses) = models
    assert torch.equal(fast_losses, autograd_losses)
    for a, b in zip(fast.parameters(), autograd.parameters()):
        assert torch.equal(a, b)


def test_flat_adam_equals_torch_fused_adam_and_shares_its_state_dict():
    torch.manual_seed(0)
    ours, theirs = mnist_mlp.NoteModel([32, 16]), mnist_mlp.NoteModel([32, 16])
    theirs.load_state_dict(ours.state_dict())
    flat = mnist_mlp.FlatAdam(ours.parameters(), lr=0.01)
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01, fused=True)
    x, labels = torch.randn(50, 784), torch.randint(0, 10, (50,))
    for _ in range(25):
        for model, optimizer in ((ours, flat), (theirs, reference)):
            mnist_mlp.textbook_step(model, nn.CrossEntropyLoss(), optimizer, x, labels)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    saved, expected = flat.state_dict(), reference.state_dict()
    assert saved["param_groups"][0]["params"] == expected["param_groups"][0]["params"]
    for index, state in expected["state"].items():
        assert set(saved["state"][index]) == set(state)
        assert all(torch.equal(saved["state"][index][key], value) for key, value in state.items())
    # and back: torch's Adam takes our state, ours takes torch's, and both go on identically
    copy = mnist_mlp.NoteModel([32, 16])
    copy.load_state_dict(ours.state_dict())
    reloaded = mnist_mlp.FlatAdam(copy.parameters(), lr=0.01)
    reloaded.load_state_dict(mnist_mlp.plain_copy(expected))
    for model, optimizer in ((copy, reloaded), (theirs, reference)):
        mnist_mlp.textbook_step(model, nn.CrossEntropyLoss(), optimizer, x, labels)
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), theirs.parameters()))


def test_flushing_denormals_keeps_the_weights_bit_identical_over_two_real_epochs(mnist, one_thread):
    train_split, _ = mnist
    runs = []
    for flush in (True, False):
        torch.manual_seed(1)
        model = mnist_mlp.NoteModel()
        optimizer = mnist_mlp.make_optimizer("adam", model.parameters(), 0.001)
        step, _ = mnist_mlp.make_train_step(model, nn.CrossEntropyLoss(), optimizer)
        generator = torch.Generator().manual_seed(1)
        with mnist_mlp.denormals_flushed() if flush else contextlib.nullcontext():
            for _ in range(2):
                mnist_mlp.train_epoch(step, train_split, mnist_mlp.epoch_order(len(train_split), generator), 64)
        exp_avg = torch.cat([state["exp_avg"].flatten() for state in optimizer.state.values()])
        denormal = (exp_avg != 0) & (exp_avg.abs() < torch.finfo(torch.float32).tiny)
        runs.append((model, int(denormal.sum())))
    (flushed, flushed_denormals), (plain, plain_denormals) = runs
    assert plain_denormals > 1000 and flushed_denormals == 0  # the case is real, and flushing removes it
    assert all(torch.equal(a, b) for a, b in zip(flushed.parameters(), plain.parameters()))
    assert not mnist_mlp.denormals_are_flushed()


def test_denormals_flushed_restores_the_setting_it_found():
    assert not mnist_mlp.denormals_are_flushed()
    torch.set_flush_denormal(True)
    try:
        with mnist_mlp.denormals_flushed():
            assert mnist_mlp.denormals_are_flushed()
        assert mnist_mlp.denormals_are_flushed()
    finally:
        torch.set_flush_denormal(False)
    with mnist_mlp.denormals_flushed():
        assert mnist_mlp.denormals_are_flushed()
    assert not mnist_mlp.denormals_are_flushed()


def test_an_edited_model_trains_what_it_computes(monkeypatch, tmp_path, capsys):
    """The student's first edit: sigmoid for ReLU. It must train as a sigmoid net, through autograd."""
    monkeypatch.setattr(mnist_mlp, "NoteModel", SigmoidModel)
    code, out, _ = run_main(train, ["--epochs", "1", "--checkpoint-dir", tmp_path, "--device", "cpu"], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("training with the autograd step (the model's forward() computes")
    assert "CUDA" not in out.splitlines()[0]  # on the CPU there is no graph to speak of
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    assert_usage_error(*run_main(train, ["--epochs", "1", "--checkpoint-dir", tmp_path / "fast", "--device", "cpu",
                                         "--step", "fast"], capsys)[::2], "--step fast")


def test_a_model_with_an_added_dropout_trains(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mnist_mlp, "NoteModel", DropoutModel)
    code, out, _ = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "out"), capsys)
    assert code == 0 and "autograd step" in out.splitlines()[0] and "Dropout" in out.splitlines()[0]
    assert (tmp_path / "out" / "noteLearning_2.pth").is_file()


# ----------------------------------------------------------------------------- train.py and evaluate.py

def test_tiny_idx_dataset_trains_and_checkpoints(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    code, out, _ = run_main(train, ["--epochs", "3", "--data-dir", root, "--checkpoint-dir", tmp_path,
                                    "--device", "cpu", "--batch-size", "32", "--log-interval", "4"], capsys)
    assert code == 0
    assert "epoch 1/3  step 4/8  loss" in out
    for epoch in (1, 2, 3):
        checkpoint = torch.load(tmp_path / f"noteLearning_{epoch}.pth", weights_only=True, map_location="cpu")
        assert checkpoint["epoch"] == epoch
    assert checkpoint["metrics"]["test_accuracy"] == 100.0  # the bars are easy to tell apart
    assert checkpoint["config"] == {"hidden": [128, 64], "optimizer": "adam", "lr": 0.001, "betas": [0.9, 0.999],
                                    "eps": 1e-08, "weight_decay": 0, "batch_size": 32, "seed": 1,
                                    "dataset": "mnist", "val_size": 0, "fused": True, "threads": 1}
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


def test_evaluate_reports_the_accuracy_train_printed(trained, capsys):
    folder, output = trained
    printed = output.split("test accuracy ")[1].split("%")[0]
    path = folder / "noteLearning_1.pth"
    code, out, _ = run_main(evaluate, [path, "--device", "cpu"], capsys)
    assert code == 0 and f"= {printed}%" in out
    code, out, _ = run_main(evaluate, [path, "--json"], capsys)
    result = json.loads(out)
    assert f"{result['accuracy']:.2f}" == printed and result["total"] == 10000 and result["epoch"] == 1
    assert result["correct"] == round(float(printed) * 100)


def test_evaluate_several_checkpoints_marks_the_best(trained, tmp_path, capsys):
    folder, _ = trained
    worse = mnist_mlp.NoteModel().state_dict()  # untrained: about 10%
    torch.save(worse, tmp_path / "random.pth")
    code, out, _ = run_main(evaluate, [tmp_path / "random.pth", folder / "noteLearning_1.pth"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["checkpoint", "epoch", "accuracy", "correct", "loss"]
    assert lines[2].endswith("<- best test accuracy") and "<- best" not in lines[1]
    code, out, _ = run_main(evaluate, [tmp_path / "random.pth", folder / "noteLearning_1.pth", "--json"], capsys)
    assert [result["epoch"] for result in json.loads(out)] == [0, 1]


def test_checkpoint_is_plain_data_and_loads_on_the_cpu(trained):
    folder, _ = trained
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True, map_location="cpu")
    assert set(checkpoint) >= {"model", "optimizer", "epoch", "config", "metrics", "torch_version"}
    tutorial = TutorialNet()
    tutorial.load_state_dict(checkpoint["model"])  # the tutorial's own class takes our weights
    assert all(value.device.type == "cpu" for value in checkpoint["model"].values())


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], ["--epochs", "from 1"]),
    (["--batch-size", "-3"], ["--batch-size"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--optimizer", "rmsprop"], ["--optimizer"]),
])
def test_train_rejects_bad_numbers(argv, words, capsys):
    assert_usage_error(*run_main(train, argv, capsys)[::2], *words)


def test_unavailable_device_is_an_error_not_a_fallback(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main(train, ["--device", "cuda", "--checkpoint-dir", tmp_path], capsys)
    assert_usage_error(code, err, "CUDA is not available")
    assert_usage_error(*run_main(train, ["--device", "tpu"], capsys)[::2], "tpu")
    assert os.listdir(tmp_path) == []


def test_missing_data_names_the_files_and_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets.MNIST, "mirrors", [])  # no network in tests: the download fails at once
    code, _, err = run_main(train, ["--data-dir", tmp_path / "nothing", "--checkpoint-dir", tmp_path / "out",
                                    "--device", "cpu"], capsys)
    assert_usage_error(code, err, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "--data-dir",
                       str(tmp_path / "nothing" / "MNIST" / "raw"))
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()


def test_unreadable_data_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "data.txt"
    not_a_folder.write_text("hello")
    code, _, err = run_main(train, ["--data-dir", not_a_folder, "--checkpoint-dir", tmp_path], capsys)
    assert_usage_error(code, err, "data folder")


def test_evaluate_rejects_missing_and_non_checkpoint_files(tmp_path, capsys):
    assert_usage_error(*run_main(evaluate, [tmp_path / "nope.pth"], capsys)[::2], "no such file")
    assert_usage_error(*run_main(evaluate, [tmp_path], capsys)[::2], "is a folder")
    (tmp_path / "notes.pth").write_text("not a checkpoint at all\n")
    assert_usage_error(*run_main(evaluate, [tmp_path / "notes.pth"], capsys)[::2], "not a readable checkpoint")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "other.pth"], capsys)[::2], "no model weights")


def test_evaluate_rejects_a_checkpoint_whose_shapes_do_not_fit(tmp_path, capsys):
    state = mnist_mlp.NoteModel().state_dict()
    state["fc2.weight"] = torch.zeros(64, 100)
    torch.save(state, tmp_path / "odd.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "odd.pth"], capsys)[::2], "does not fit")


def test_scripts_exit_2_with_one_line_in_a_real_process(tmp_path):
    for argv in (["train.py", "--epochs", "0"], ["evaluate.py", str(tmp_path / "missing.pth")]):
        result = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]],
                                capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for text in ("--epochs", "(default: 20)", "(default: 64)", "(default: 0.001)", "(default: adam)"):
        assert text in out


# ----------------------------------------------------------------------------- resume, crashes, safety

def tiny_run(tmp_path, *extra):
    """train.py flags for a quick run on a tiny IDX dataset in tmp_path/data."""
    root = tmp_path / "data"
    if not root.exists():
        make_tiny_mnist(root)
    return ["--data-dir", root, "--device", "cpu", "--batch-size", "32", *extra]


def test_resume_continues_bit_identically_without_rewriting_earlier_epochs(tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", straight), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", split), capsys)[0] == 0
    first = (split / "noteLearning_1.pth").read_bytes()
    code, out, _ = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", split,
                                            "--resume", split / "noteLearning_1.pth"), capsys)
    assert code == 0 and "epoch 1/3" not in out and "epoch 2/3" in out
    assert (split / "noteLearning_1.pth").read_bytes() == first
    a = torch.load(straight / "noteLearning_3.pth", weights_only=True)
    b = torch.load(split / "noteLearning_3.pth", weights_only=True)
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    timing = {"seconds", "samples_per_s"}
    assert {key: value for key, value in a["metrics"].items() if key not in timing} == \
        {key: value for key, value in b["metrics"].items() if key not in timing}
    assert (straight / "metrics.csv").read_text().split("\n")[1:] and \
        [row.split(",")[:6] for row in (straight / "metrics.csv").read_text().splitlines()] == \
        [row.split(",")[:6] for row in (split / "metrics.csv").read_text().splitlines()]


def test_resume_refuses_other_hidden_sizes_and_finished_runs(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    before = (folder / "noteLearning_1.pth").read_bytes()
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder, "--hidden", "32",
                                            "--resume", folder / "noteLearning_1.pth"), capsys)
    assert_usage_error(code, err, "hidden sizes [128, 64]", "--hidden 128 64")
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder,
                                            "--resume", folder / "noteLearning_1.pth"), capsys)
    assert_usage_error(code, err, "already at epoch 1")
    assert (folder / "noteLearning_1.pth").read_bytes() == before
    assert sorted(os.listdir(folder)) == ["metrics.csv", "noteLearning_1.pth"]


KILLER = """
import io, os, signal, sys
sys.path.insert(0, {here!r})
import torch, mnist_mlp, train

moment, epoch = sys.argv[1], int(sys.argv[2])
real_atomic_write = mnist_mlp.atomic_write

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

mnist_mlp.atomic_write = atomic_write
if moment == "step":
    real_call, calls = mnist_mlp.FastStep.__call__, []
    def call(self, x, labels):
        calls.append(1)
        if len(calls) == epoch:
            die()
        return real_call(self, x, labels)
    mnist_mlp.FastStep.__call__ = call
sys.exit(train.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("moment, epoch, survivors", [
    ("checkpoint", 2, [1]),   # killed halfway through writing noteLearning_2.pth
    ("checkpoint", 1, []),
    ("metrics", 2, [1, 2]),   # killed halfway through rewriting metrics.csv
    ("step", 20, [1, 2]),     # killed in the middle of epoch 3 (8 steps an epoch)
])
def test_sigkill_at_any_moment_leaves_only_complete_files(tmp_path, moment, epoch, survivors):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(here=HERE))
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "4", "--checkpoint-dir", ".")]
    result = subprocess.run([sys.executable, str(script), moment, str(epoch), *argv],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    files = sorted(name for name in os.listdir(tmp_path) if name.endswith(".pth"))
    assert files == [f"noteLearning_{number}.pth" for number in survivors]
    for name in files:
        checkpoint = mnist_mlp.load_checkpoint(str(tmp_path / name))
        assert checkpoint["epoch"] == int(name.split("_")[1].split(".")[0])
        mnist_mlp.model_from_checkpoint(name, checkpoint)
    if survivors:
        rows = (tmp_path / "metrics.csv").read_text().splitlines()
        assert [row.split(",")[0] for row in rows[1:]] == [str(n) for n in survivors[:len(rows) - 1]]
        assert len(rows) - 1 >= len(survivors) - (moment == "metrics")
    leftovers = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert all(name.startswith(".") for name in leftovers)  # hidden temp files, never a final name


def start_training(tmp_path, argv, wait_for, stdout=subprocess.DEVNULL):
    """Start train.py in its own process in tmp_path; return it once tmp_path/wait_for exists."""
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], cwd=tmp_path,
                               stdout=stdout, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if (tmp_path / wait_for).exists():
            break
        time.sleep(0.1)
    return process


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
    script = os.path.join(HERE, "train.py")  # run from another folder: the hint names the script's path
    assert f"resume with: python {script} {' '.join(argv)} --resume ck/noteLearning_{last}.pth" in err
    mnist_mlp.load_checkpoint(str(tmp_path / "ck" / f"noteLearning_{last}.pth"))


def test_diverging_loss_stops_with_the_step_and_keeps_earlier_checkpoints(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--optimizer", "sgd",
                                    "--lr", "0.01"), capsys)[0] == 0
    before = (folder / "noteLearning_1.pth").read_bytes()
    resumed = os.path.abspath(folder / "noteLearning_1.pth")
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder, "--optimizer", "sgd",
                                            "--lr", "0.01", "--resume", resumed), capsys)
    assert code == 0
    # the same run resumed with a huge --lr is refused as another setting; a fresh run diverges
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "bad",
                                            "--optimizer", "sgd", "--lr", "1e6"), capsys)
    assert_usage_error(code, err, "non-finite at step", "smaller --lr")
    assert not os.listdir(tmp_path / "bad")
    assert (folder / "noteLearning_1.pth").read_bytes() == before


def test_a_divergence_in_the_last_update_of_an_epoch_saves_nothing(tmp_path, capsys):
    """One step an epoch: the loss is fine before the update; only the weights after it show the NaN."""
    code, out, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "out",
                                              "--optimizer", "sgd", "--lr", "1e30", "--batch-size", "256"), capsys)
    assert_usage_error(code, err, "non-finite", "epoch 1", "nothing of it was saved")
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()
    assert not (tmp_path / "out" / "metrics.csv").exists()


class Hostile:
    """Unpickling this creates a file: the kind of code a checkpoint must never get to run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_refused_and_does_not_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"model": Hostile(str(marker))}, tmp_path / "evil.pth")
    code, _, err = run_main(evaluate, [tmp_path / "evil.pth"], capsys)
    assert_usage_error(code, err, "refused", "open")
    code, _, err = run_main(train, ["--resume", tmp_path / "evil.pth", "--checkpoint-dir", tmp_path], capsys)
    assert_usage_error(code, err, "refused")
    assert not marker.exists()


@pytest.mark.parametrize("make", ["empty", "truncated", "png"])
def test_broken_checkpoints_are_one_line_errors(make, trained, tmp_path, capsys):
    path = tmp_path / "broken.pth"
    if make == "empty":
        path.write_bytes(b"")
    elif make == "truncated":
        data = (trained[0] / "noteLearning_1.pth").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        from PIL import Image
        Image.new("L", (28, 28)).save(path, format="PNG")
    assert_usage_error(*run_main(evaluate, [path], capsys)[::2], "not a readable checkpoint")
    code, _, err = run_main(train, ["--resume", path, "--checkpoint-dir", tmp_path / "out"], capsys)
    assert_usage_error(code, err, "not a readable checkpoint")
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()


# The tutorial's own program: its model class lives in __main__, and it pickles the whole model.
TUTORIAL_SCRIPT = """
import sys, torch
from torch import nn
from torchvision import datasets, transforms

""" + inspect.getsource(TutorialNet).replace("TutorialNet", "NoteModel") + """
model = NoteModel()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True)["model"])
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
test_loader = torch.utils.data.DataLoader(datasets.MNIST(sys.argv[2], train=False, transform=transform), batch_size=1000)
correct = 0
with torch.no_grad():
    for images, labels in test_loader:
        correct += (model(images).argmax(1) == labels).sum().item()
print(f"Accuracy: {100 * correct / 10000:.2f}%")
torch.save(model, sys.argv[3])
"""


def test_the_tutorials_pickled_model_loads_only_with_trust_pickle(trained, tmp_path, capsys):
    script = tmp_path / "tutorial.py"
    script.write_text(TUTORIAL_SCRIPT)
    old = tmp_path / "old.pth"
    result = subprocess.run([sys.executable, str(script), str(trained[0] / "noteLearning_1.pth"),
                             mnist_mlp.DEFAULT_DATA_DIR, str(old)], capture_output=True, text=True, check=True)
    printed = result.stdout.split("Accuracy: ")[1].split("%")[0]

    assert_usage_error(*run_main(evaluate, [old], capsys)[::2], "pickled model", "--trust-pickle")
    code, out, err = run_main(evaluate, [old, "--trust-pickle"], capsys)
    assert code == 0 and f"= {printed}%" in out
    assert err.startswith("warning: ") and "runs code" in err and err.count("\n") == 1

    folder = tmp_path / "resumed"
    code, _, _ = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--lr", "1e-12",
                                          "--resume", old, "--trust-pickle"), capsys)
    assert code == 0
    start = torch.load(trained[0] / "noteLearning_1.pth", weights_only=True)["model"]
    after = torch.load(folder / "noteLearning_1.pth", weights_only=True)["model"]
    for key in start:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-6)


def write_raw(root, name, data):
    folder = root / "MNIST" / "raw"
    (folder / name).write_bytes(data)


@pytest.mark.parametrize("damage, words", [
    ("truncated", ["train-images-idx3-ubyte", "truncated"]),
    ("magic", ["train-labels-idx1-ubyte", "magic"]),
    ("gz", ["cannot decompress", "t10k-images-idx3-ubyte.gz"]),
])
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
    code, _, err = run_main(train, ["--data-dir", root, "--checkpoint-dir", tmp_path / "out", "--device", "cpu"], capsys)
    assert_usage_error(code, err, *words)
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()
    assert not (raw / "t10k-images-idx3-ubyte").exists() or damage != "gz"


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


# ----------------------------------------------------------------------------- reports, validation, datasets

def test_per_class_and_confusion_agree_with_accuracy(trained, capsys):
    path = trained[0] / "noteLearning_1.pth"
    code, out, _ = run_main(evaluate, [path, "--json"], capsys)
    result = json.loads(out)
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 10000
    assert int(confusion.trace()) == result["correct"]
    assert torch.equal(confusion.sum(1), torch.bincount(mnist_mlp.load_dataset(
        mnist_mlp.DEFAULT_DATA_DIR, download=False)[1].labels, minlength=10))
    per_class = (100 * confusion.diag() / confusion.sum(1)).tolist()
    assert result["per_class"] == [round(value, 2) for value in per_class]
    code, out, _ = run_main(evaluate, [path, "--per-class", "--confusion"], capsys)
    lines = out.splitlines()
    assert lines[1] == "accuracy per class:" and lines[2].split() == ["0", f"{result['per_class'][0]:.2f}%"]
    matrix_rows = lines[lines.index("confusion matrix (rows = true class, columns = predicted):") + 2:]
    assert [int(value) for value in matrix_rows[3].split()[1:]] == result["confusion"][3]


def test_save_errors_writes_a_png_grid_of_misclassified_images(trained, tmp_path, capsys):
    from PIL import Image
    path = tmp_path / "errors.png"
    code, out, _ = run_main(evaluate, [trained[0] / "noteLearning_1.pth", "--save-errors", path], capsys)
    assert code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[1] == 8 * (28 * 2 + 14)  # 64 errors: 8 rows
        assert image.size[0] >= 8 * 28 * 2
    assert_usage_error(*run_main(evaluate, [trained[0] / "noteLearning_1.pth", "--save-errors",
                                            tmp_path / "errors.jpg"], capsys)[::2], ".png")


def test_validation_split_is_held_out_from_training_and_reported(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    full, _ = mnist_mlp.load_dataset(str(root), download=False)
    train_part, val_part = mnist_mlp.split_validation(full, 56, seed=1)
    assert (len(train_part), len(val_part)) == (200, 56)
    rows = {tuple(row.tolist()) for row in full.pixels}
    assert len(rows) == 256  # every tiny image is distinct, so rows identify images
    train_rows = {tuple(row.tolist()) for row in train_part.pixels}
    val_rows = {tuple(row.tolist()) for row in val_part.pixels}
    assert not train_rows & val_rows and train_rows | val_rows == rows

    folder = tmp_path / "out"
    code, out, _ = run_main(train, tiny_run(tmp_path, "--epochs", "1", "--val-size", "56", "--checkpoint-dir", folder),
                            capsys)
    assert code == 0 and "val accuracy" in out and "step" not in out.split("train loss")[0].split("\n", 1)[1]
    header, row = (folder / "metrics.csv").read_text().splitlines()
    assert header.split(",")[2:4] == ["val_loss", "val_accuracy"] and row.split(",")[3] != ""
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", root, "--json"], capsys)
    assert json.loads(out)["validation"]["total"] == 56
    assert_usage_error(*run_main(train, tiny_run(tmp_path, "--val-size", "256", "--checkpoint-dir", folder),
                                 capsys)[::2], "--val-size")


def test_fashion_mnist_from_local_gz_files(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data", compress=True)
    os.rename(root / "MNIST", root / "FashionMNIST")
    folder = tmp_path / "out"
    code, out, _ = run_main(train, ["--dataset", "fashion-mnist", "--data-dir", root, "--epochs", "1",
                                    "--checkpoint-dir", folder, "--device", "cpu", "--batch-size", "32"], capsys)
    assert code == 0 and "fashion-mnist" in out
    assert torch.load(folder / "noteLearning_1.pth", weights_only=True)["config"]["dataset"] == "fashion-mnist"
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", root, "--per-class"], capsys)
    assert code == 0 and "fashion-mnist test set" in out and "Ankle boot" in out


# ----------------------------------------------------------------------------- one run per folder, files, odd input

def test_a_second_run_in_the_same_folder_is_refused_unless_overwrite(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)[0] == 0
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--lr", "0.002", "--checkpoint-dir", folder),
                            capsys)
    assert_usage_error(code, err, "already holds another run", "--overwrite")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    code, _, _ = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--lr", "0.002", "--checkpoint-dir", folder,
                                          "--overwrite"), capsys)
    assert code == 0
    assert sorted(os.listdir(folder)) == ["metrics.csv", "noteLearning_1.pth", "noteLearning_2.pth"]
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
    assert torch.load(folder / "noteLearning_2.pth", weights_only=True)["config"]["lr"] == 0.002
    assert_usage_error(*run_main(train, ["--resume", "", "--checkpoint-dir", folder], capsys)[::2],
                       "--resume needs a checkpoint path")


def test_resuming_refuses_later_checkpoints_of_another_continuation(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder), capsys)[0] == 0
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder,
                                            "--resume", folder / "noteLearning_1.pth"), capsys)
    assert_usage_error(code, err, "noteLearning_2.pth", "--overwrite")
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder, "--overwrite",
                                    "--resume", folder / "noteLearning_1.pth"), capsys)[0] == 0
    assert [row.split(",")[0] for row in (folder / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2", "3"]


def test_a_second_run_at_the_same_time_is_told_who_holds_the_folder(tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "100000", "--checkpoint-dir", "ck")]
    first = start_training(tmp_path, argv, "ck/noteLearning_1.pth")
    try:
        second = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *argv, "--overwrite"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=120)
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert f"another train.py (process {first.pid}) is writing to ck" in second.stderr
    assert first.returncode == 143  # SIGTERM: stopped between steps, as for Ctrl-C
    assert (tmp_path / "ck" / "noteLearning_1.pth").exists()


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
    damaged = {"bom": b"\xef\xbb\xbf" + text.encode(), "semicolons": text.replace(",", ";").encode(),
               "latin1": text.encode() + "2,caf\xe9\n".encode("latin-1")}[damage]
    path.write_bytes(damaged)
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder,
                                            "--resume", folder / "noteLearning_2.pth"), capsys)
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
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", folder,
                                    "--resume", folder / "noteLearning_2.pth"), capsys)[0] == 0
    new_rows = (folder / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in new_rows[1:]] == ["1", "2", "3"]
    assert new_rows[2].split(",")[:6] == rows[2].split(",")[:6]


def test_files_get_the_mode_the_umask_allows(tmp_path, capsys):
    old = os.umask(0o022)
    try:
        root = make_tiny_mnist(tmp_path / "data", compress=True)
        folder = tmp_path / "out"
        assert run_main(train, ["--data-dir", root, "--device", "cpu", "--batch-size", "32", "--epochs", "1",
                                "--checkpoint-dir", folder], capsys)[0] == 0
        assert run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", root,
                                   "--save-errors", tmp_path / "errors.png"], capsys)[0] == 0
    finally:
        os.umask(old)
    for path in (folder / "noteLearning_1.pth", folder / "metrics.csv", tmp_path / "errors.png",
                 root / "MNIST" / "raw" / "train-images-idx3-ubyte"):
        assert os.stat(path).st_mode & 0o777 == 0o644, path


def test_stale_torchvision_cache_files_cannot_replace_the_raw_files(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    processed = root / "MNIST" / "processed"
    processed.mkdir()
    fake = (torch.zeros(100, 28, 28, dtype=torch.uint8), torch.zeros(100, dtype=torch.long))
    torch.save(fake, processed / "training.pt")
    torch.save(fake, processed / "test.pt")
    train_split, test_split = mnist_mlp.load_dataset(str(root), download=False)
    assert (len(train_split), len(test_split)) == (256, 64)
    (processed / "training.pt").write_bytes(b"garbage")
    assert len(mnist_mlp.load_dataset(str(root), download=False)[0]) == 256


def test_an_empty_gz_is_an_error_and_a_fixed_one_heals(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data", compress=True)
    raw = root / "MNIST" / "raw"
    good = (raw / "t10k-labels-idx1-ubyte.gz").read_bytes()
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb"):
        pass
    with pytest.raises(mnist_mlp.UsageError, match="t10k-labels-idx1-ubyte.gz"):
        mnist_mlp.load_dataset(str(root), download=False)
    assert not (raw / "t10k-labels-idx1-ubyte").exists()
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(good)
    assert len(mnist_mlp.load_dataset(str(root), download=False)[1]) == 64


def test_a_fifo_is_refused_not_waited_on(tmp_path, capsys):
    root = make_tiny_mnist(tmp_path / "data")
    os.remove(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    os.mkfifo(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    with pytest.raises(mnist_mlp.UsageError, match="not a regular file"):
        mnist_mlp.load_dataset(str(root), download=False)
    folder = tmp_path / "out"
    folder.mkdir()
    os.mkfifo(folder / "metrics.csv")
    code, _, err = run_main(train, tiny_run(tmp_path / "other", "--checkpoint-dir", folder, "--epochs", "1"), capsys)
    assert_usage_error(code, err, "metrics.csv")
    os.mkfifo(tmp_path / "fifo.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "fifo.pth"], capsys)[::2], "not a regular file")
    assert_usage_error(*run_main(evaluate, ["/dev/zero"], capsys)[::2], "not a regular file")


def save_odd(tmp_path, change):
    """A good checkpoint with one field changed by change(checkpoint); returns its path."""
    model = mnist_mlp.NoteModel()
    checkpoint = {"model": model.state_dict(), "epoch": 1,
                  "config": {"hidden": [128, 64], "dataset": "mnist", "val_size": 0, "seed": 1}}
    change(checkpoint)
    path = tmp_path / "odd.pth"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda c: c.update(config=5), ["config"]),
    (lambda c: c.update(config=[1, 2]), ["config"]),
    (lambda c: c["config"].update(hidden=None), ["hidden"]),
    (lambda c: c["config"].update(hidden="128"), ["hidden"]),
    (lambda c: c["config"].update(hidden=[-5]), ["hidden"]),
    (lambda c: c["config"].update(hidden=[10**7]), ["hidden"]),
    (lambda c: c["model"].update({"fc1.weight": torch.tensor(1.0)}), ["fc1.weight"]),
    (lambda c: c["config"].update(dataset="cifar10"), ["cifar10"]),
    (lambda c: c["config"].update(val_size=5000.5), ["val_size"]),
    (lambda c: (c["config"].update(val_size=5000), c["config"].pop("seed")), ["seed"]),
    (lambda c: c.update(epoch=torch.tensor(3)), ["epoch"]),
    (lambda c: c.update(epoch=None), ["epoch"]),
    (lambda c: c.update(epoch="abc"), ["epoch"]),
    (lambda c: c["model"].update({"fc1.weight": torch.zeros(1, 1).expand(10**7, 784),
                                  "fc1.bias": torch.zeros(1).expand(10**7)}), ["stride"]),
    (lambda c: c["model"]["fc2.weight"].fill_(float("nan")), ["NaN"]),
])
def test_odd_checkpoint_fields_are_one_line_errors(change, words, tmp_path, capsys):
    path = save_odd(tmp_path, change)
    assert os.path.getsize(path) < 1_000_000
    assert_usage_error(*run_main(evaluate, [path], capsys)[::2], *words)
    code, _, err = run_main(train, tiny_run(tmp_path, "--resume", path, "--checkpoint-dir", tmp_path / "out"), capsys)
    assert_usage_error(code, err, *words)


@pytest.mark.parametrize("entry, value", [("optimizer", {"state": 5}), ("rng", {"data_order": "x"}), ("rng", 7)])
def test_malformed_optimizer_or_rng_entries_are_one_line_errors_on_resume(entry, value, tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True)
    checkpoint[entry] = value
    torch.save(checkpoint, tmp_path / "odd.pth")
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next",
                                            "--resume", tmp_path / "odd.pth"), capsys)
    assert_usage_error(code, err, entry)


def test_resume_warns_without_rng_and_refuses_other_fused_or_thread_settings(tmp_path, capsys):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder), capsys)[0] == 0
    for flags, words in ((["--no-fused"], "--no-fused"), (["--threads", "2"], "--threads")):
        if "--threads" in flags and (os.cpu_count() or 1) < 2:
            continue
        code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", folder, *flags,
                                                "--resume", folder / "noteLearning_1.pth"), capsys)
        assert_usage_error(code, err, words, "other settings")
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True)
    del checkpoint["rng"]
    torch.save(checkpoint, tmp_path / "no-rng.pth")
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next",
                                            "--resume", tmp_path / "no-rng.pth"), capsys)
    assert code == 0 and err.startswith("warning: ") and "random-generator state" in err


def test_a_failed_write_mid_run_is_one_error_line_with_the_resume_command(tmp_path, monkeypatch, capsys):
    real_save = mnist_mlp.save_checkpoint

    def save(path, checkpoint):
        if checkpoint["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return real_save(path, checkpoint)

    monkeypatch.setattr(mnist_mlp, "save_checkpoint", save)
    code, _, err = run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", tmp_path / "out"), capsys)
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert lines[0].startswith("error: cannot write") and "No space left on device" in lines[0]
    assert lines[1].endswith("noteLearning_1.pth") and lines[2].startswith("resume with: python ")


def test_save_errors_to_a_missing_folder_or_a_folder_fails_before_evaluating(trained, tmp_path, capsys):
    path = trained[0] / "noteLearning_1.pth"
    assert_usage_error(*run_main(evaluate, [path, "--save-errors", tmp_path / "nowhere" / "e.png"], capsys)[::2],
                       "no folder")
    (tmp_path / "dir.png").mkdir()
    assert_usage_error(*run_main(evaluate, [path, "--save-errors", tmp_path / "dir.png"], capsys)[::2], "folder")


def test_output_into_a_closed_pipe_neither_crashes_nor_loses_checkpoints(tmp_path):
    argv = [str(arg) for arg in tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", "ck", "--log-interval", "1")]
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'train.py'))} "
                            f"{shlex.join(argv)} | head -1", shell=True, cwd=tmp_path, capture_output=True, text=True)
    assert result.stdout.startswith("training with the") and "Traceback" not in result.stderr
    assert (tmp_path / "ck" / "noteLearning_3.pth").exists()
    result = subprocess.run(f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(HERE, 'evaluate.py'))} "
                            f"ck/noteLearning_1.ck ck/noteLearning_1.pth ck/noteLearning_2.pth --data-dir data "
                            f"--per-class --confusion | head -c 10", shell=True, cwd=tmp_path, capture_output=True,
                            text=True)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, words", [
    (["--momentum", "-5"], ["--momentum"]),
    (["--momentum", "2"], ["--momentum"]),
    (["--seed", "18446744073709551616"], ["--seed"]),
    (["--hidden", "100000000000000000000"], ["--hidden"]),
    (["--threads", "1000"], ["--threads"]),
    (["--lr", "abc"], ["--lr"]),
])
def test_out_of_range_flags_are_one_line_errors(argv, words, capsys):
    assert_usage_error(*run_main(train, argv, capsys)[::2], *words)


def test_bench_refuses_absurd_warmups(capsys):
    import bench
    assert_usage_error(*run_main(bench, ["--warmup-epochs", str(10**20)], capsys)[::2], "--warmup-epochs")
    assert_usage_error(*run_main(bench, ["--steps", "0"], capsys)[::2], "--steps")


def test_evaluate_json_never_prints_nan_and_picks_the_best_by_validation(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "2", "--val-size", "56", "--checkpoint-dir", folder), capsys)[0] == 0
    results = [{"checkpoint": "a", "accuracy": 99.0, "loss": 0.1, "validation": {"accuracy": 80.0}},
               {"checkpoint": "b", "accuracy": 90.0, "loss": 0.2, "validation": {"accuracy": 85.0}}]
    assert evaluate.best_index(results) == (1, "validation accuracy")
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", folder / "noteLearning_2.pth",
                                       "--data-dir", tmp_path / "data"], capsys)
    assert code == 0 and "<- best validation accuracy" in out
    real_evaluate = mnist_mlp.evaluate
    monkeypatch.setattr(mnist_mlp, "evaluate", lambda *args, **kwargs: dataclasses.replace(
        real_evaluate(*args, **kwargs), loss=float("inf")))  # huge logits: cross-entropy overflows
    code, out, _ = run_main(evaluate, [folder / "noteLearning_1.pth", "--data-dir", tmp_path / "data", "--json"], capsys)
    assert code == 0 and json.loads(out)["loss"] is None


# ----------------------------------------------------------------------------- plot.py

def write_metrics_csv(folder, accuracies, losses=None):
    folder.mkdir(parents=True)
    rows = ["epoch,train_loss,val_loss,val_accuracy,test_loss,test_accuracy,seconds,samples_per_s,checkpoint"]
    for epoch, accuracy in enumerate(accuracies, start=1):
        loss = losses[epoch - 1] if losses else 1.0 / epoch
        rows.append(f"{epoch},{loss},,,0.5,{accuracy},1.0,60000,noteLearning_{epoch}.pth")
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_plot_groups_seeds_into_a_mean_with_a_band(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot
    runs = [write_metrics_csv(tmp_path / "adam-1", [90, 94, 96]), write_metrics_csv(tmp_path / "adam-2", [92, 95, 97]),
            write_metrics_csv(tmp_path / "sgd", [80, 85, 88])]
    groups = plot.group_by_setting([plot.read_run(str(run)) for run in runs])
    assert list(groups) == ["adam", "sgd"] and len(groups["adam"]) == 2
    assert plot.spread(groups["adam"], "test_accuracy") == ([1, 2, 3], [91.0, 94.5, 96.5], [90.0, 94.0, 96.0],
                                                             [92.0, 95.0, 97.0])
    output = tmp_path / "curves.png"
    code, out, _ = run_main(plot, [*runs, runs[2] / "metrics.csv", "-o", output], capsys)
    assert code == 0 and "4 runs in 2 settings" in out
    from PIL import Image
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (1100, 420)


def test_plot_bad_input_is_one_line_errors(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import plot
    assert_usage_error(*run_main(plot, [tmp_path / "missing"], capsys)[::2], "no such file")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert_usage_error(*run_main(plot, [tmp_path / "other.csv"], capsys)[::2], "no column", "test_accuracy")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.csv").write_text("epoch,train_loss,test_accuracy\n")
    assert_usage_error(*run_main(plot, [tmp_path / "empty"], capsys)[::2], "empty run")
    assert_usage_error(*run_main(plot, [tmp_path / "empty", "-o", tmp_path / "x.jpg"], capsys)[::2], ".png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run_main(plot, [write_metrics_csv(tmp_path / "run", [90])], capsys)
    assert_usage_error(code, err, "pip install matplotlib")


# ----------------------------------------------------------------------------- CUDA (skipped without a GPU)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_fast_step_equals_the_autograd_step_to_float_rounding(mnist):
    train_split, _ = mnist
    train_split = train_split.to("cuda")
    models = []
    for choice in ("fast", "autograd"):
        torch.manual_seed(4)
        model = mnist_mlp.NoteModel().cuda()
        step, description = make_step(model, choice)
        assert description.startswith(choice)
        order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(4))
        mnist_mlp.train_epoch(step, train_split, order[:40 * 64], 64)
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_one_epoch_reaches_90_percent_and_evaluates_the_same_on_the_cpu(graph, tmp_path, capsys):
    argv = ["--epochs", "1", "--device", "cuda", "--checkpoint-dir", tmp_path] + ([] if graph else ["--no-cuda-graph"])
    code, out, _ = run_main(train, argv, capsys)
    assert code == 0 and out.splitlines()[0].startswith("training with the fast step")
    assert ("CUDA graph" in out.splitlines()[0]) == graph
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    results = {}
    for device in ("cuda", "cpu"):
        code, out, _ = run_main(evaluate, [tmp_path / "noteLearning_1.pth", "--device", device, "--json"], capsys)
        results[device] = json.loads(out)
    assert f"{results['cuda']['accuracy']:.2f}" == f"{accuracy:.2f}"
    assert abs(results["cpu"]["correct"] - results["cuda"]["correct"]) <= 2  # GPU and CPU round differently


@needs_cuda
@pytest.mark.parametrize("graph", [False, True])
def test_cuda_resume_continues_exactly(graph, tmp_path, capsys):
    flags = ["--device", "cuda"] + ([] if graph else ["--no-cuda-graph"])
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", straight, *flags), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", split, *flags), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", split, *flags,
                                    "--resume", split / "noteLearning_1.pth"), capsys)[0] == 0
    a = torch.load(straight / "noteLearning_3.pth", weights_only=True)["model"]
    b = torch.load(split / "noteLearning_3.pth", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


@needs_cuda
def test_bench_runs_on_cuda(capsys):
    import bench
    code, out, _ = run_main(bench, ["--device", "cuda", "--steps", "50", "--warmup-epochs", "0", "--json",
                                    "--pipelines", "ours", "autograd", "floor"], capsys)
    report = json.loads(out)
    assert code == 0 and report["ours_samples_per_s"] > 0 and report["autograd_samples_per_s"] > 0


# ----------------------------------------------------------------------------- predict.py

def as_user_would_have_it(pixels, rng):
    """An MNIST digit (784 bytes) re-rendered as a user's picture: dark ink on (sometimes grey) paper,
    scaled up 3-6x, placed off centre, sometimes with salt noise."""
    from PIL import Image, ImageChops, ImageOps
    digit = Image.frombytes("L", (28, 28), bytes(pixels.tolist()))
    scale = rng.randint(3, 6)
    ink = ImageOps.invert(digit.resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    width, height = 28 * scale + rng.randint(10, 80), 28 * scale + rng.randint(10, 80)
    picture = Image.new("L", (width, height), rng.choice([255, 255, 215]))
    left, top = rng.randint(0, width - 28 * scale), rng.randint(0, height - 28 * scale)
    box = (left, top, left + 28 * scale, top + 28 * scale)
    picture.paste(ImageChops.darker(picture.crop(box), ink), box[:2])
    if rng.random() < 0.4:
        speckles = picture.load()
        for _ in range(width * height // 500):
            speckles[rng.randrange(width), rng.randrange(height)] = rng.randint(0, 80)
    return picture


def test_predict_reads_digits_as_a_user_would_have_them(trained, mnist, tmp_path, capsys):
    import random
    import predict
    _, test_split = mnist
    count, rng = 300, random.Random(0)
    folder = tmp_path / "digits"
    folder.mkdir()
    for index in range(count):
        label = int(test_split.labels[index])
        as_user_would_have_it(test_split.pixels[index], rng).save(folder / f"{label}_{index:03d}.png")
    checkpoint = trained[0] / "noteLearning_1.pth"
    model = mnist_mlp.model_from_checkpoint(checkpoint, mnist_mlp.load_checkpoint(str(checkpoint))).eval()
    with torch.no_grad():
        predictions = model(mnist_mlp.normalize(test_split.pixels[:count])).argmax(1)
    original = 100 * float((predictions == test_split.labels[:count]).float().mean())
    code, out, _ = run_main(predict, [checkpoint, folder, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["labelled"] == count
    assert abs(report["accuracy"] - original) <= 2.0, (report["accuracy"], original)
    first = report["predictions"][0]
    assert set(first) >= {"image", "prediction", "probability", "top3", "label", "correct"}
    assert len(first["top3"]) == 3 and first["top3"][0] == [first["prediction"], first["probability"]]


def test_an_mnist_image_passes_through_unchanged(mnist):
    from PIL import Image
    _, test_split = mnist
    for index in range(20):
        image = Image.frombytes("L", (28, 28), bytes(test_split.pixels[index].tolist()))
        assert torch.equal(mnist_mlp.digit_pixels(image), test_split.pixels[index].view(28, 28))


def test_prepared_digits_have_mnist_geometry():
    from PIL import Image, ImageDraw
    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))  # transparent means paper
    ImageDraw.Draw(image).line([(40, 20), (60, 180)], fill=(0, 0, 0, 255), width=12)
    pixels = mnist_mlp.digit_pixels(image).float()
    rows, columns = (pixels > 0).any(1).nonzero().flatten(), (pixels > 0).any(0).nonzero().flatten()
    assert int(rows[-1] - rows[0] + 1) == 20 and int(columns[-1] - columns[0] + 1) < 20
    centre = [float((pixels.sum(axis) * torch.arange(28)).sum() / pixels.sum()) for axis in (1, 0)]
    assert all(abs(value - 14) <= 0.5 for value in centre)
    sixteen_bit = Image.new("I;16", (120, 120), 65535)
    ImageDraw.Draw(sixteen_bit).ellipse([(30, 20), (90, 100)], outline=0, width=10)
    assert int(mnist_mlp.digit_pixels(sixteen_bit).max()) > 200


def test_predict_reports_bad_images_one_line_each_and_the_rest(trained, tmp_path, capsys, monkeypatch):
    import predict
    from PIL import Image, ImageDraw
    good = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(good).line([(30, 6), (30, 54)], fill=0, width=5)
    good.save(tmp_path / "1_good.jpg")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    Image.new("L", (80, 80), 255).save(tmp_path / "huge.png")
    monkeypatch.setattr(predict, "MAX_PIXELS", 5000)  # so that an 80x80 image stands for a 100-megapixel photo
    checkpoint = trained[0] / "noteLearning_1.pth"
    code, out, err = run_main(predict, [checkpoint, tmp_path / "missing.png", tmp_path / "text.png",
                                        tmp_path / "blank.png", tmp_path / "huge.png", tmp_path / "1_good.jpg",
                                        "--show", tmp_path / "show.png"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "1_good.jpg: 1 (" in out and "accuracy over 1 labelled images: 1/1" in out
    errors = err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    for name, words in (("missing.png", "no such file"), ("text.png", "not an image"), ("blank.png", "no ink"),
                        ("huge.png", "more than the 5,000")):
        assert any(name in line and words in line for line in errors), (name, errors)
    assert (tmp_path / "show.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_usage_error(*run_main(predict, [checkpoint, tmp_path / "1_good.jpg", "--show", tmp_path / "x.jpg"],
                                 capsys)[::2], ".png")


def test_predict_uses_the_checkpoints_class_names(tmp_path, capsys):
    import predict
    from PIL import Image, ImageDraw
    torch.manual_seed(0)
    torch.save({"model": mnist_mlp.NoteModel().state_dict(), "epoch": 1, "config": {"dataset": "fashion-mnist"}},
               tmp_path / "fashion.pth")
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).rectangle([(16, 8), (48, 56)], fill=0)
    image.save(tmp_path / "coat.png")
    code, out, _ = run_main(predict, [tmp_path / "fashion.pth", tmp_path / "coat.png", "--json"], capsys)
    names = mnist_mlp.DATASETS["fashion-mnist"][1]
    assert code == 0 and json.loads(out)["predictions"][0]["prediction"] in names


def test_evaluation_runs_in_eval_mode_and_gives_the_mode_back(mnist):
    _, test_split = mnist
    model = DropoutModel()
    small = mnist_mlp.Split(test_split.pixels[:500], test_split.labels[:500])
    first = mnist_mlp.evaluate(model.train(), small)
    assert model.training
    assert mnist_mlp.evaluate(model, small).loss == first.loss  # no dropout drawn: the same figures twice
    mnist_mlp.misclassified(model, small)
    assert model.training
