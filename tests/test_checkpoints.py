"""Checkpoints: what is saved, and what is refused on loading (hostile pickles, broken files, odd fields,
the tutorial's pickled model without --trust-pickle), each as one line."""

import inspect
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import evaluate
import mnist_mlp
import train
import tutorial
from mnist_mlp_tools import checkpoints, commands, fast_step, models
from tests.conftest import WARM_PYTHON, assert_usage_error, run_main, tiny_run


def test_checkpoint_is_plain_data_and_loads_on_the_cpu(trained):
    folder, _ = trained
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True, map_location="cpu")
    assert set(checkpoint) >= {"model", "optimizer", "epoch", "config", "metrics", "torch_version"}
    theirs = tutorial.NoteModel()
    theirs.load_state_dict(checkpoint["model"])  # the tutorial's own class takes our weights
    assert all(value.device.type == "cpu" for value in checkpoint["model"].values())


def test_evaluate_rejects_missing_and_non_checkpoint_files(tmp_path, capsys):
    assert_usage_error(*run_main(evaluate, [tmp_path / "nope.pth"], capsys)[::2], "no such file")
    assert_usage_error(*run_main(evaluate, [tmp_path], capsys)[::2], "is a folder")
    (tmp_path / "notes.pth").write_text("not a checkpoint at all\n")
    assert_usage_error(
        *run_main(evaluate, [tmp_path / "notes.pth"], capsys)[::2], "not a checkpoint written by train.py"
    )
    torch.save({"weights": [1, 2, 3]}, tmp_path / "other.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "other.pth"], capsys)[::2], "no model weights")


def test_evaluate_rejects_a_checkpoint_whose_shapes_do_not_fit(tmp_path, capsys):
    state = mnist_mlp.NoteModel().state_dict()
    state["fc2.weight"] = torch.zeros(64, 100)
    torch.save(state, tmp_path / "odd.pth")
    assert_usage_error(*run_main(evaluate, [tmp_path / "odd.pth"], capsys)[::2], "does not fit")


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
    assert_usage_error(*run_main(evaluate, [path], capsys)[::2], "not a checkpoint written by train.py")
    code, _, err = run_main(train, ["--resume", path, "--checkpoint-dir", tmp_path / "out"], capsys)
    assert_usage_error(code, err, "not a checkpoint written by train.py")
    assert not (tmp_path / "out" / "noteLearning_1.pth").exists()


# The tutorial's own program: its model class lives in __main__, and it pickles the whole model.
TUTORIAL_SCRIPT = (
    """
import sys, torch
from torch import nn
import torch.nn.functional as F
from torchvision import datasets, transforms

"""
    + inspect.getsource(tutorial.NoteModel)
    + """
model = NoteModel()
model.load_state_dict(torch.load(sys.argv[1], weights_only=True)["model"])
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
test_set = datasets.MNIST(sys.argv[2], train=False, transform=transform)
test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
correct = 0
with torch.no_grad():
    for images, labels in test_loader:
        correct += (model(images).argmax(1) == labels).sum().item()
print(f"Accuracy: {100 * correct / 10000:.2f}%")
torch.save(model, sys.argv[3])
"""
)


@pytest.mark.slow
def test_the_tutorials_pickled_model_loads_only_with_trust_pickle(trained, tmp_path, capsys):
    script = tmp_path / "tutorial.py"
    script.write_text(TUTORIAL_SCRIPT)
    old = tmp_path / "old.pth"
    result = subprocess.run(
        [*WARM_PYTHON, str(script), str(trained[0] / "noteLearning_1.pth"), commands.DEFAULT_DATA_DIR, str(old)],
        capture_output=True,
        text=True,
        check=True,
    )
    printed = result.stdout.split("Accuracy: ")[1].split("%")[0]

    assert_usage_error(*run_main(evaluate, [old], capsys)[::2], "pickled model", "__main__.NoteModel", "--trust-pickle")
    code, out, err = run_main(evaluate, [old, "--trust-pickle"], capsys)
    assert code == 0 and f"= {printed}%" in out
    assert err.startswith("warning: ") and "runs code" in err and err.count("\n") == 1

    folder = tmp_path / "resumed"
    code, _, _ = run_main(
        train,
        tiny_run(
            tmp_path, "--epochs", "1", "--checkpoint-dir", folder, "--lr", "1e-12", "--resume", old, "--trust-pickle"
        ),
        capsys,
    )
    assert code == 0
    start = torch.load(trained[0] / "noteLearning_1.pth", weights_only=True)["model"]
    after = torch.load(folder / "noteLearning_1.pth", weights_only=True)["model"]
    for key in start:
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=1e-6)


def save_odd(tmp_path, change):
    """A good checkpoint with one field changed by change(checkpoint); returns its path."""
    model = mnist_mlp.NoteModel()
    checkpoint = {
        "model": model.state_dict(),
        "epoch": 1,
        "config": {"hidden": [128, 64], "dataset": "mnist", "val_size": 0, "seed": 1},
    }
    change(checkpoint)
    path = tmp_path / "odd.pth"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "change, words",
    [
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
        (
            lambda c: c["model"].update(
                {"fc1.weight": torch.zeros(1, 1).expand(10**7, 784), "fc1.bias": torch.zeros(1).expand(10**7)}
            ),
            ["fc1.weight", "stride"],
        ),
        (lambda c: c["model"]["fc2.weight"].fill_(float("nan")), ["NaN"]),
        # the rule, not a list of known bad cases: dtypes, devices and types that no rule allows
        (
            lambda c: c["model"].update({"fc1.weight": c["model"]["fc1.weight"].to(torch.float8_e4m3fn)}),
            ["fc1.weight", "float8_e4m3fn", "not a finite (no NaN or infinity) CPU tensor of real numbers"],
        ),
        (lambda c: c["model"].update({"fc1.bias": torch.empty(128, device="meta")}), ["fc1.bias", "on meta"]),
        (lambda c: c["model"].update({"extra": torch.zeros(3, dtype=torch.complex64)}), ["extra", "complex64"]),
        (
            lambda c: c["model"].update({"fc1.weight": c["model"]["fc1.weight"].double()}),
            ["fc1.weight is torch.float64 there, torch.float32 in NoteModel"],
        ),
        (lambda c: c["config"].update(dataset=["mnist"]), ["dataset", "one of mnist, fashion-mnist"]),
        (lambda c: c["config"].update(model_source=["x"]), ["model_source"]),
        (lambda c: c.update(metrics={"test_accuracy": [[1.0]]}), ["metrics's test_accuracy"]),
        # a value of the wrong type anywhere, however it compares: an empty tensor for the learning rate
        (lambda c: c["config"].update(lr=torch.tensor([])), ["config's lr", "not a finite number"]),
        (lambda c: c.update(payload=torch.zeros(3)), ["not a checkpoint written by train.py", "payload"]),
    ],
)
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
    code, _, err = run_main(
        train,
        tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next", "--resume", tmp_path / "odd.pth"),
        capsys,
    )
    assert_usage_error(code, err, entry)


def nest(depth):
    """A list nested `depth` deep: 3,000 is three times Python's default recursion limit, and as deep as Python
    3.13's pickler writes (its C recursion is bounded too, whatever sys.setrecursionlimit says)."""
    value = 0.001
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "optimizer, change, words",
    [
        ("adam", lambda o: o["param_groups"][0].update(lr=1e6), ["lr 1000000.0", "--lr"]),
        ("adam", lambda o: o["param_groups"][0].update(betas=(0.5, 0.5)), ["betas (0.5, 0.5)", "the default"]),
        ("adam", lambda o: o["state"][0].update(exp_avg=torch.zeros(1)), ["exp_avg of parameter 0", "[128, 784]"]),
        ("adam", lambda o: o["state"][2].update(exp_avg_sq=torch.zeros(64, 128, dtype=torch.float64)), ["exp_avg_sq"]),
        ("adam", lambda o: o["state"][1].update(step=torch.tensor(3.5)), ["step count"]),
        ("adam", lambda o: o["state"][1].update(step=torch.tensor(12.0)), ["different step counts"]),
        ("adam", lambda o: o["state"].update({9: {}}), ["no parameter"]),
        ("adam", lambda o: o["state"][0].update(extra=[[[[1]]]]), ["holds"]),
        ("adam", lambda o: o["param_groups"].append(dict(o["param_groups"][0])), ["one param group"]),
        ("sgd", lambda o: o["state"][0].update(momentum_buffer=torch.zeros(3)), ["momentum_buffer of parameter 0"]),
        ("sgd", lambda o: o["param_groups"][0].update(momentum=0.5), ["momentum", "--momentum"]),
        # the group's rule, not known cases: what torch's optimizers compute with, other keys, other types
        ("adam", lambda o: o["param_groups"][0].update(amsgrad=True), ["amsgrad True", "this run's is False"]),
        ("adam", lambda o: o["param_groups"][0].update(maximize=True), ["maximize True"]),
        ("sgd", lambda o: o["param_groups"][0].update(nesterov=True), ["nesterov True"]),
        ("adam", lambda o: o["param_groups"][0].update(lr=nest(3000)), ["lr a list of 1"]),
        ("adam", lambda o: o["param_groups"][0].update(betas=nest(3000)), ["betas"]),
        ("adam", lambda o: o["param_groups"][0].update(params=nest(3000)), ["names parameters"]),
        ("adam", lambda o: o["param_groups"][0].update(lookahead=0.5), ["lookahead", "adam does not make"]),
        ("adam", lambda o: o["param_groups"][0].update(foreach="yes"), ["foreach yes"]),
        (
            "adam",
            lambda o: o["state"][1].update(step=torch.empty((), device="meta")),
            ["step count of parameter 1", "meta"],
        ),
        ("adam", lambda o: o["state"][0].update(exp_avg=torch.zeros(1).expand(128, 784)), ["exp_avg of parameter 0"]),
    ],
)
def test_an_optimizer_state_that_does_not_fit_the_run_is_refused_whole(optimizer, change, words, tmp_path, capsys):
    """Before this, such states were trained with (a saved lr of 1e6 overrode --lr), broadcast over the
    weights (Adam's m of the wrong shape) or crashed the process (SGD's momentum buffer: SIGSEGV)."""
    flags = ["--optimizer", optimizer] + (["--lr", "0.01"] if optimizer == "sgd" else [])
    folder = tmp_path / "out"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", folder, *flags), capsys)[0] == 0
    checkpoint = torch.load(folder / "noteLearning_1.pth", weights_only=True)
    change(checkpoint["optimizer"])
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # pickling a deep nesting needs it; reading it back must not
    try:
        torch.save(checkpoint, tmp_path / "odd.pth")
    finally:
        sys.setrecursionlimit(limit)
    code, _, err = run_main(
        train,
        tiny_run(
            tmp_path, "--epochs", "2", "--checkpoint-dir", tmp_path / "next", *flags, "--resume", tmp_path / "odd.pth"
        ),
        capsys,
    )
    assert_usage_error(code, err, "optimizer state", *words)
    assert not (tmp_path / "next" / "noteLearning_2.pth").exists()


def test_a_small_file_that_unpacks_to_far_more_is_refused_before_loading(tmp_path, capsys):
    import zipfile

    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))  # 64 MiB of zeros in about 64 KB
    assert os.path.getsize(bomb) < 1 << 20
    assert_usage_error(*run_main(evaluate, [bomb], capsys)[::2], "would unpack to 67,108,864 bytes", "refused")


# ----------------------------------------------------------------------------- the rules, on generated inputs

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool, torch.complex64]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
)
TENSORS = st.builds(
    lambda shape, dtype, fill: torch.full(shape, fill).to(dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from(DTYPES),
    st.sampled_from([0.0, 1.5, float("nan"), float("inf")]),
)
VALUES = st.recursive(
    TENSORS | SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(0, 9), inner, max_size=3)
    ),
    max_leaves=8,
)
PLACES = [
    ("epoch",),
    ("metrics",),
    ("metrics", "test_accuracy"),
    ("rng",),
    ("rng", "data_order"),
    ("model", "fc1.bias"),
    ("model", "extra"),
    ("torch_version",),
    ("payload",),
] + [
    ("config", key)
    for key in (
        "hidden",
        "optimizer",
        "lr",
        "betas",
        "inputs",
        "batch_size",
        "seed",
        "dataset",
        "val_size",
        "fused",
        "threads",
        "run",
        "model_source",
        "other",
    )
]


def good_checkpoint():
    torch.manual_seed(0)
    model = mnist_mlp.NoteModel(8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    model(torch.zeros(2, 784)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 1,
        "config": {
            "hidden": [8, 8],
            "optimizer": "adam",
            "lr": 0.001,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 0,
            "dataset": "mnist",
            "seed": 1,
            "val_size": 0,
            "batch_size": 64,
        },
        "metrics": {"test_accuracy": 10.0},
        "rng": {"data_order": torch.Generator().get_state(), "torch": torch.get_rng_state()},
        "torch_version": "2",
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(place=st.sampled_from(PLACES), value=VALUES, depth=st.sampled_from([0, 0, 0, 3000]))
def test_any_value_anywhere_in_a_checkpoint_is_read_or_refused_in_one_line(place, value, depth, tmp_path):
    """The rule, not a list of cases: whatever a field holds (a wrong type, NaN, a tensor of any dtype or
    shape, nesting thousands deep), loading and building the model either works or is one UsageError."""
    checkpoint = good_checkpoint()
    for _ in range(depth):
        value = [value]
    *parents, key = place
    target = checkpoint
    for parent in parents:
        target = target[parent]
    target[key] = value
    path = tmp_path / "generated.pth"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # pickling a deep nesting needs it; reading it back must not
    try:
        torch.save(checkpoint, path)
    finally:
        sys.setrecursionlimit(limit)
    try:
        loaded = checkpoints.load_checkpoint(str(path))
        models.model_from_checkpoint(str(path), loaded)
    except commands.UsageError as error:
        assert "\n" not in str(error) and len(str(error)) < 1000


@settings(max_examples=400, deadline=None)
@given(
    place=st.sampled_from(
        [
            ("state", 0, "exp_avg"),
            ("state", 0, "step"),
            ("state", 5),
            ("state", "x"),
            ("param_groups", 0, "lr"),
            ("param_groups", 0, "betas"),
            ("param_groups", 0, "params"),
            ("param_groups", 0, "amsgrad"),
            ("param_groups", 0, "foreach"),
            ("param_groups", 0, "other"),
            ("param_groups", 1),
            ("state",),
        ]
    ),
    value=VALUES,
    depth=st.sampled_from([0, 0, 3000]),
)
def test_any_optimizer_state_is_loaded_or_refused_in_one_line(place, value, depth):
    """A state that passes the rule loads into this run's optimizer; every other is one UsageError."""
    saved = good_checkpoint()["optimizer"]
    for _ in range(depth):
        value = [value]
    *parents, key = place
    target = saved
    for parent in parents:
        target = target[parent]
    if isinstance(target, list) and key >= len(target):
        target.append(value)
    else:
        target[key] = value
    model = mnist_mlp.NoteModel(8, 8)
    _, optimizer, _ = fast_step.make_training(model, torch.nn.CrossEntropyLoss(), {"optimizer": "adam", "lr": 0.001})
    try:
        checkpoints.check_optimizer_state("x.pth", saved, optimizer, {"optimizer": "adam", "lr": 0.001})
    except commands.UsageError as error:
        assert "\n" not in str(error)
        return
    optimizer.load_state_dict(saved)  # what passed the rule loads
