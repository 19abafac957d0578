"""The fast path: which models take it and which step aside (and say why), FlatAdam against torch's
Adam, and flushing denormals."""

import contextlib
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mnist_mlp
import train
from mnist_mlp_tools import checkpoints, commands, fast_step
from tests.conftest import (
    ROOT,
    DeeperModel,
    DropoutModel,
    SigmoidModel,
    assert_usage_error,
    make_step,
    make_tiny_mnist,
    run_at_once,
    run_main,
    tiny_run,
)


def test_the_plain_model_takes_the_fast_step_and_edited_models_the_autograd_step():
    step, description = make_step(mnist_mlp.NoteModel())
    assert isinstance(step, fast_step.FastStep) and description.startswith("fast step")
    for model, words in (
        (SigmoidModel(), "computes something other"),
        (DropoutModel(), "Dropout"),
        (DeeperModel(), None),
    ):
        step, description = make_step(model)
        if words is None:
            assert isinstance(step, fast_step.FastStep)
        else:
            assert (
                not isinstance(step, fast_step.FastStep)
                and description.startswith("autograd step")
                and words in description
            ), description
    hooked = mnist_mlp.NoteModel()
    hooked.fc2.register_forward_hook(lambda module, inputs, output: None)
    assert "hooks" in make_step(hooked)[1]
    assert "as asked" in make_step(mnist_mlp.NoteModel(), "autograd")[1]
    with pytest.raises(commands.UsageError, match="--step fast cannot train this model exactly"):
        make_step(SigmoidModel(), "fast")
    loss_with_smoothing = fast_step.make_training(
        mnist_mlp.NoteModel(), nn.CrossEntropyLoss(label_smoothing=0.1), {"optimizer": "sgd", "lr": 0.1}
    )
    assert "nn.CrossEntropyLoss()" in loss_with_smoothing[2]


def test_the_fast_step_check_leaves_no_trace():
    class FunctionalDropout(mnist_mlp.NoteModel):  # no module to see: only the probe can tell
        def forward(self, x):
            return self.fc3(F.dropout(F.relu(self.fc2(F.relu(self.fc1(x.view(-1, 784))))), 0.5, self.training))

    model, plain = FunctionalDropout(), mnist_mlp.NoteModel()
    before = torch.get_rng_state()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    assert "computes something other" in fast_step.fast_step_problem(model, nn.CrossEntropyLoss(), [64])
    assert fast_step.fast_step_problem(model.eval(), nn.CrossEntropyLoss(), [64]) is None  # no dropout in eval mode
    assert fast_step.fast_step_problem(plain, nn.CrossEntropyLoss(), [64]) is None
    assert all(parameter.grad is None for parameter in plain.parameters())
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def fast_and_reference(widths, settings, threads, steps):
    """Two copies of NoteModel(*widths): one trained `steps` steps by train.py's fast step and its optimizer,
    one by the textbook step and torch's own optimizer (fused where settings say), on `threads` threads."""
    torch.manual_seed(0)
    ours, theirs = mnist_mlp.NoteModel(*widths), mnist_mlp.NoteModel(*widths)
    theirs.load_state_dict(ours.state_dict())
    torch_class = torch.optim.Adam if settings["optimizer"] == "adam" else torch.optim.SGD
    options = {key: settings[key] for key in ("lr", "momentum") if key in settings}
    reference = torch_class(theirs.parameters(), **options, **({"fused": True} if settings.get("fused") else {}))
    x, labels = torch.randn(50, 784), torch.randint(0, 10, (50,))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        step, flat, _ = fast_step.make_training(ours, nn.CrossEntropyLoss(), settings, "fast", [50])
        assert isinstance(flat, fast_step.FlatOptimizer)
        assert flat.state_dict() == reference.state_dict()  # nothing yet, the same group, key for key
        for _ in range(steps):
            step(x, labels)
            mnist_mlp.textbook_step(theirs, nn.CrossEntropyLoss(), reference, x, labels)
    finally:
        torch.set_num_threads(threads_before)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    saved, expected = flat.state_dict(), reference.state_dict()
    assert saved["param_groups"] == expected["param_groups"] and saved["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        assert all(torch.equal(saved["state"][index][key], value) for key, value in state.items())
    # and back: ours takes torch's state and goes on as torch does
    copy = mnist_mlp.NoteModel(*widths)
    copy.load_state_dict(ours.state_dict())
    step, reloaded, _ = fast_step.make_training(copy, nn.CrossEntropyLoss(), settings, "fast", [50])
    reloaded.load_state_dict(checkpoints.plain_copy(expected))
    step(x, labels)
    mnist_mlp.textbook_step(theirs, nn.CrossEntropyLoss(), reference, x, labels)
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), theirs.parameters()))


@pytest.mark.parametrize("fused, threads, widths", [(False, 1, (65, 17)), (False, 2, (65, 17)), (True, 1, (32, 16))])
def test_flat_adam_equals_torchs_adam_and_shares_its_state_dict(fused, threads, widths):
    """The default (for-loop) update with odd widths, so that no tensor ends where a vector of the
    flat buffer does, and on 2 threads the buffer is cut into the threads' shares elsewhere than the
    tensors are. The fused kernel is position-dependent (its vector tails round differently), so it
    equals torch's fused Adam only where every tensor's size is a multiple of the vector width."""
    fast_and_reference(widths, {"optimizer": "adam", "lr": 0.01, "fused": fused}, threads, 25)


@pytest.mark.parametrize("momentum, threads", [(0.9, 1), (0.9, 2), (0.0, 1)])
def test_flat_sgd_equals_torchs_sgd_and_shares_its_state_dict(momentum, threads):
    fast_and_reference((65, 17), {"optimizer": "sgd", "lr": 0.05, "momentum": momentum}, threads, 6)


def test_the_flat_optimizers_step_aside_where_the_kernels_are_not_position_independent(monkeypatch):
    """Where a kernel rounds an element differently in its vector body than in its scalar tail, one
    call over the flat buffer would not be torch's per-tensor loop: the fast step then runs torch's own."""
    for update in (fast_step.adam_elementwise, fast_step.sgd_elementwise):  # the kernels of this machine, asked
        assert fast_step.elementwise_is_position_independent(update, "cpu")
    monkeypatch.setattr(fast_step, "elementwise_is_position_independent", lambda update, device: False)
    for name in ("adam", "sgd"):
        model = mnist_mlp.NoteModel(65, 17)
        step, optimizer, _ = fast_step.make_training(model, nn.CrossEntropyLoss(), {"optimizer": name, "lr": 0.01})
        assert isinstance(step, fast_step.FastStep) and type(optimizer) in (torch.optim.Adam, torch.optim.SGD)


@pytest.mark.slow
def test_flushing_denormals_keeps_the_weights_bit_identical_over_two_real_epochs(mnist, one_thread):
    train_split, _ = mnist
    runs = []
    for flush in (True, False):
        torch.manual_seed(1)
        model = mnist_mlp.NoteModel()
        step, optimizer, _ = fast_step.make_training(model, nn.CrossEntropyLoss(), {"optimizer": "adam", "lr": 0.001})
        generator = torch.Generator().manual_seed(1)
        with fast_step.denormals_flushed() if flush else contextlib.nullcontext():
            for _ in range(2):
                mnist_mlp.train_epoch(step, train_split, mnist_mlp.epoch_order(len(train_split), generator).split(64))
        exp_avg = torch.cat([state["exp_avg"].flatten() for state in optimizer.state.values()])
        denormal = (exp_avg != 0) & (exp_avg.abs() < torch.finfo(torch.float32).tiny)
        runs.append((model, int(denormal.sum())))
    (flushed, flushed_denormals), (plain, plain_denormals) = runs
    assert plain_denormals > 1000 and flushed_denormals == 0  # the case is real, and flushing removes it
    assert all(torch.equal(a, b) for a, b in zip(flushed.parameters(), plain.parameters()))
    assert not fast_step.denormals_are_flushed()


def test_denormals_flushed_restores_the_setting_it_found():
    assert not fast_step.denormals_are_flushed()
    torch.set_flush_denormal(True)
    try:
        with fast_step.denormals_flushed():
            assert fast_step.denormals_are_flushed()
        assert fast_step.denormals_are_flushed()
    finally:
        torch.set_flush_denormal(False)
    with fast_step.denormals_flushed():
        assert fast_step.denormals_are_flushed()
    assert not fast_step.denormals_are_flushed()


def test_an_edited_model_trains_what_it_computes(monkeypatch, tmp_path, capsys):
    """The student's first edit: sigmoid for ReLU. It must train as a sigmoid net, through autograd."""
    monkeypatch.setattr(mnist_mlp, "NoteModel", SigmoidModel)
    code, out, _ = run_main(train, ["--epochs", "1", "--checkpoint-dir", tmp_path, "--device", "cpu"], capsys)
    assert code == 0
    assert out.splitlines()[0].startswith("training with the autograd step (the model's forward() computes")
    assert "CUDA" not in out.splitlines()[0]  # on the CPU there is no graph to speak of
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    assert_usage_error(
        *run_main(
            train, ["--epochs", "1", "--checkpoint-dir", tmp_path / "fast", "--device", "cpu", "--step", "fast"], capsys
        )[::2],
        "--step fast",
    )


def test_a_model_with_an_added_dropout_trains(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(mnist_mlp, "NoteModel", DropoutModel)
    code, out, _ = run_main(train, tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "out"), capsys)
    assert code == 0 and "autograd step" in out.splitlines()[0] and "Dropout" in out.splitlines()[0]
    assert (tmp_path / "out" / "noteLearning_2.pth").is_file()


def test_the_probe_uses_the_runs_own_batch_sizes(monkeypatch):
    """The proof is made on each batch size the run steps with (the full batch and an epoch's short
    last one), and on no other: a probe larger than the run's batches would allocate for nothing."""
    shapes, real_rand = [], torch.rand

    def recording_rand(*size, **kwargs):
        shapes.append(size)
        return real_rand(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", recording_rand)
    model = mnist_mlp.NoteModel()
    assert fast_step.fast_step_problem(model, nn.CrossEntropyLoss(), [64, 32, 64]) is None
    assert shapes == [(32, 784), (64, 784)]


def test_a_batch_size_where_the_fast_step_rounds_otherwise_is_trained_by_autograd(monkeypatch):
    """A matrix product may round otherwise at one shape than at another: the proof covers each of the
    epoch's batch sizes. Simulated here by one ulp at batch 32 only."""
    real = fast_step.FastStep.forward_backward

    def off_at_32(self, x, labels, grads):
        loss, logits = real(self, x, labels, grads)
        if len(labels) == 32:
            grads[-1][0].view(-1)[0] = torch.nextafter(grads[-1][0].view(-1)[0], torch.tensor(1.0))
        return loss, logits

    monkeypatch.setattr(fast_step.FastStep, "forward_backward", off_at_32)
    model = mnist_mlp.NoteModel()
    step, description = make_step(model, batch_sizes=[64, 32])
    assert description.startswith("autograd step") and "at batch 32, 1 thread" in description
    assert isinstance(make_step(mnist_mlp.NoteModel(), batch_sizes=[64])[0], fast_step.FastStep)


@settings(max_examples=12, deadline=None)
@given(
    widths=st.tuples(st.integers(1, 40), st.integers(1, 40)),
    sizes=st.sets(st.integers(1, 70), min_size=1, max_size=2),
    threads=st.integers(1, 2),
    optimizer=st.sampled_from(["adam", "sgd"]),
)
def test_the_step_chosen_trains_as_the_textbook_step_on_its_threads_and_shapes(widths, sizes, threads, optimizer):
    """Whatever step make_training proves for a run's widths, batch sizes and threads, it updates the
    weights bit for bit as mnist_mlp.textbook_step with torch's own optimizer does."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        ours, theirs = mnist_mlp.NoteModel(*widths), mnist_mlp.NoteModel(*widths)
        theirs.load_state_dict(ours.state_dict())
        reference = (
            torch.optim.Adam(theirs.parameters(), lr=0.01)
            if optimizer == "adam"
            else torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9)
        )
        settings = {"optimizer": optimizer, "lr": 0.01, "momentum": 0.9}
        step, _, _ = fast_step.make_training(ours, nn.CrossEntropyLoss(), settings, "auto", sizes)
        for size in sorted(sizes) * 2:
            x, labels = torch.randn(size, 784), torch.randint(0, 10, (size,))
            step(x, labels)
            mnist_mlp.textbook_step(theirs, nn.CrossEntropyLoss(), reference, x, labels)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


NO_DYNAMO = """
import sys
sys.path.insert(0, {here!r})
import draw, evaluate, predict, train
folder, data = {folder!r}, {data!r}
tiny = ["--data-dir", data, "--device", "cpu", "--log-interval", "1000"]
assert train.main([*tiny, "--epochs", "1", "--checkpoint-dir", folder]) == 0
assert train.main([*tiny, "--epochs", "2", "--checkpoint-dir", folder, "--resume", folder + "/noteLearning_1.pth"]) == 0
assert train.main([*tiny, "--epochs", "1", "--checkpoint-dir", folder + "/sgd", "--optimizer", "sgd"]) == 0
assert evaluate.main([folder + "/noteLearning_2.pth", "--data-dir", data]) == 0
assert predict.main([folder + "/noteLearning_2.pth", {image!r}]) == 0
draw.DigitReader(folder + "/noteLearning_2.pth", draw.commands.resolve_device("cpu"))
print("torch._dynamo imported:", "torch._dynamo" in sys.modules)
"""


@pytest.mark.slow
def test_the_default_paths_never_import_torch_dynamo(tmp_path):
    """torch.optim.Optimizer's methods import torch._dynamo (about 2 s of start-up) on first use:
    the default optimizers, resume, saving, evaluate, predict and draw do without them."""
    data = make_tiny_mnist(tmp_path / "data")
    script = NO_DYNAMO.format(
        here=ROOT,
        folder=str(tmp_path / "run"),
        data=str(data),
        image=os.path.join(ROOT, "docs", "figures", "draw_example.png"),
    )
    result, bare = run_at_once(
        *[
            dict(args=[sys.executable, "-c", code], capture_output=True, text=True)
            for code in (script, "import sys, torch; print('torch._dynamo' in sys.modules)")
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    if bare.stdout.strip() == "True":
        pytest.skip("this torch version imports torch._dynamo with torch itself")
    assert result.stdout.strip().endswith("torch._dynamo imported: False"), result.stdout[-500:]


class SometimesUnused(mnist_mlp.NoteModel):
    """An edit whose extra layer takes part in every other step only: torch's Adam skips it on the others."""

    def __init__(self):
        super().__init__(16, 16)
        self.extra, self.calls = nn.Linear(16, 16), 0

    def forward(self, x):
        self.calls += 1
        x = F.relu(self.fc2(F.relu(self.fc1(x.view(-1, 784)))))
        return self.fc3(F.relu(self.extra(x)) if self.calls % 2 else x)


@pytest.mark.parametrize("model_class", [SigmoidModel, SometimesUnused])
def test_the_autograd_step_with_the_flat_optimizer_trains_as_torchs_adam(model_class):
    """The textbook step's gradients copied into the flat buffer; a parameter left without one hands
    the stepping to torch's own Adam, from the state so far."""
    torch.manual_seed(0)
    ours, theirs = model_class(), model_class()
    theirs.load_state_dict(ours.state_dict())
    step, flat, description = fast_step.make_training(ours, nn.CrossEntropyLoss(), {"optimizer": "adam", "lr": 0.01})
    reference = torch.optim.Adam(theirs.parameters(), lr=0.01)
    assert description.startswith("autograd step") and isinstance(flat, fast_step.FlatAdam)
    x, labels = torch.randn(20, 784), torch.randint(0, 10, (20,))
    for _ in range(6):
        step(x, labels)
        mnist_mlp.textbook_step(theirs, nn.CrossEntropyLoss(), reference, x, labels)
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    assert (flat.torch_optimizer is not None) == (model_class is SometimesUnused)
