"""The proofs against the tutorial: the model, the data, the batches, the training steps and Adam
give what the tutorial's own code gives, bit for bit where the README says so."""

import gzip
import hashlib
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets

import bench
import mnist_mlp
import train
import tutorial
from mnist_mlp_tools import checkpoints, commands, data_files, fast_step, models
from tests.conftest import (  # noqa: F401 (mnist: a fixture, used by name)
    ROOT,
    TUTORIAL_TRANSFORM,
    DeeperModel,
    make_step,
    make_tiny_mnist,
    mnist,
    run_main,
)


def test_model_matches_the_tutorials_keys_and_shapes():
    ours, theirs = mnist_mlp.NoteModel(), tutorial.NoteModel()
    assert [(key, value.shape) for key, value in ours.state_dict().items()] == [
        (key, value.shape) for key, value in theirs.state_dict().items()
    ]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(ours(x), theirs(x))
    assert torch.equal(ours(x.view(5, 784)), ours(x))
    narrow = mnist_mlp.NoteModel(32, 16)
    assert [(name, layer.out_features) for name, layer in narrow.named_children()] == [
        ("fc1", 32),
        ("fc2", 16),
        ("fc3", 10),
    ]
    assert checkpoints.checked_checkpoint("narrow", narrow.state_dict())["config"]["hidden"] == [32, 16]
    deeper = checkpoints.checked_checkpoint("deeper", DeeperModel().state_dict())
    with pytest.raises(
        commands.UsageError,
        match=r"the checkpoint has fc4.weight, fc4.bias that NoteModel lacks; "
        r"fc3.weight is \[30, 40\] there, \[10, 40\] in NoteModel",
    ):
        models.model_from_checkpoint("deeper", deeper)


def test_normalization_equals_torchvision_transforms_bit_for_bit(mnist):  # noqa: F811 (mnist: the fixture imported above)
    train_split, _ = mnist
    dataset = datasets.MNIST(commands.DEFAULT_DATA_DIR, train=True, transform=TUTORIAL_TRANSFORM)
    indices = list(range(0, 60000, 97))
    expected = torch.stack([dataset[i][0] for i in indices])  # (N, 1, 28, 28), as the DataLoader batches them
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
    train_split, _ = data_files.load(str(root), download=False)
    dataset = datasets.MNIST(str(root), train=True, transform=TUTORIAL_TRANSFORM)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    ours = torch.Generator().manual_seed(3)
    for _ in range(2):
        order = mnist_mlp.epoch_order(len(train_split), ours)
        their_batches = list(loader)
        assert [len(y) for _, y in their_batches] == [64, 64, 64, 8]
        for batch, (x, y) in zip(order.split(64), their_batches):
            assert torch.equal(mnist_mlp.normalize(train_split.pixels[batch]), x)
            assert torch.equal(train_split.labels[batch], y)


def test_bundled_data_has_the_canonical_mnist_checksums():
    expected = {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    }
    for name, md5 in expected.items():
        with gzip.open(os.path.join(ROOT, "data", "MNIST", "raw", name + ".gz"), "rb") as file:
            assert hashlib.md5(file.read()).hexdigest() == md5, name


def test_hand_written_backward_equals_autograd_bit_for_bit(mnist):  # noqa: F811 (mnist: the fixture imported above)
    train_split, _ = mnist
    x, labels = mnist_mlp.normalize(train_split.pixels[:64]), train_split.labels[:64]
    for model_class in (mnist_mlp.NoteModel, DeeperModel):
        torch.manual_seed(0)
        reference = model_class()
        F.cross_entropy(reference(x), labels).backward()
        torch.manual_seed(0)
        model = model_class()

        layers = list(model.children())
        grads = [(torch.zeros_like(layer.weight), torch.zeros_like(layer.bias)) for layer in layers]
        loss, _ = fast_step.FastStep(layers).forward_backward(x, labels, grads)
        assert torch.equal(loss, F.cross_entropy(reference(x), labels))
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            ours.grad = grads[int(name[2]) - 1][name.endswith("bias")]
        for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(ours.grad, theirs.grad), (model_class, name)


@pytest.mark.parametrize("optimizer, fused", [("adam", False), ("sgd", False), ("adam", True), ("sgd", True)])
def test_our_loop_equals_the_tutorials_pipeline_bit_for_bit(mnist, optimizer, fused):  # noqa: F811 (mnist: the fixture imported above)
    """40 steps of DataLoader + transforms + autograd + torch's optimizer vs ours, from the same seed:
    the same weights. By default against torch's default optimizers (the tutorial's); with fused,
    against torch's fused ones."""
    steps, seed = 40, 5
    torch.manual_seed(seed)
    theirs = tutorial.NoteModel()
    options = {"fused": True} if fused else {}
    tutorial_optimizer = (
        torch.optim.Adam(theirs.parameters(), lr=0.01, **options)
        if optimizer == "adam"
        else torch.optim.SGD(theirs.parameters(), lr=0.01, momentum=0.9, **options)
    )
    dataset = datasets.MNIST(commands.DEFAULT_DATA_DIR, train=True, transform=TUTORIAL_TRANSFORM)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    criterion = nn.CrossEntropyLoss()
    for step, (images, labels) in zip(range(steps), loader):
        tutorial_optimizer.zero_grad()
        criterion(theirs(images), labels).backward()
        tutorial_optimizer.step()

    torch.manual_seed(seed)
    model = mnist_mlp.NoteModel()
    train_split, _ = mnist
    settings = {"optimizer": optimizer, "lr": 0.01, "momentum": 0.9, "fused": fused}
    step, _, _ = fast_step.make_training(model, nn.CrossEntropyLoss(), settings)
    assert isinstance(step, fast_step.FastStep)
    order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(seed))
    for batch in order.split(64)[:steps]:
        step(mnist_mlp.normalize(train_split.pixels[batch]), train_split.labels[batch])
    for ours, reference in zip(model.parameters(), theirs.parameters()):
        assert torch.equal(ours, reference)


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
        exact = (1 - 0.9**t) / math.sqrt(1 - 0.999**t)  # m_t / sqrt(v_t) for a constant gradient
        assert uncorrected[t - 1] == pytest.approx(exact, rel=1e-6)
        assert uncorrected[t - 1] == pytest.approx(expected, abs=0.05)
        assert corrected[t - 1] == pytest.approx(1.0, rel=1e-4)


def test_adam_by_hand_optimizer_equals_torch_adam_and_can_drop_the_correction():
    torch.manual_seed(0)
    models = [mnist_mlp.NoteModel(16, 16) for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    adams = [
        torch.optim.Adam(models[0].parameters(), lr=1e-3, foreach=False),
        fast_step.make_optimizer("adam-no-bias-correction", models[1].parameters(), {"lr": 1e-3}),
        mnist_mlp.AdamByHand(models[2].parameters(), lr=1e-3),
    ]
    x, labels = torch.randn(32, 784), torch.randint(0, 10, (32,))
    for _ in range(5):
        for model, optimizer in zip(models, adams):
            mnist_mlp.textbook_step(model, nn.CrossEntropyLoss(), optimizer, x, labels)
    for a, c in zip(models[0].parameters(), models[2].parameters()):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-6)
    assert fast_step.optimizer_config(adams[1])["optimizer"] == "adam-no-bias-correction"
    assert set(adams[1].state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    moved = [float((b - a).detach().abs().max()) for a, b in zip(models[0].parameters(), models[1].parameters())]
    assert max(moved) > 1e-3  # the uncorrected run went elsewhere: its early steps were larger


def test_normalize_equals_the_three_step_form_for_every_byte_value():
    every_byte = (torch.arange(784) % 256).to(torch.uint8).view(1, 784)  # one image holding every value
    textbook = every_byte.float().div(255).sub(0.5).div(0.5)  # ToTensor, then Normalize((0.5,), (0.5,))
    assert torch.equal(mnist_mlp.normalize(every_byte), textbook.view(1, 1, 28, 28))
    shifted = torch.cat([every_byte.roll(k) for k in range(40)])  # vector and tail code paths
    assert torch.equal(mnist_mlp.normalize(shifted).flatten(1), shifted.float().div(255).sub(0.5).div(0.5))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fast_and_autograd_steps_give_bit_identical_weights(mnist, optimizer):  # noqa: F811 (mnist: the fixture imported above)
    train_split, _ = mnist
    models = []
    for choice in ("fast", "autograd"):
        torch.manual_seed(4)
        model = mnist_mlp.NoteModel()
        step, _ = make_step(model, choice, optimizer, lr=0.01)
        order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(4))
        result = mnist_mlp.train_epoch(step, train_split, order[: 40 * 64].split(64))
        models.append((model, result.step_losses))
    (fast, fast_losses), (autograd, autograd_losses) = models
    assert torch.equal(fast_losses, autograd_losses)
    for a, b in zip(fast.parameters(), autograd.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_train_py_gives_the_weights_of_tutorial_py_bit_for_bit_after_a_real_epoch(tmp_path, capsys):
    """The default `python train.py` (fast step, flat Adam, denormals flushed) against the blog's own
    program (DataLoader, transforms, autograd, torch.optim.Adam), one thread each, a whole epoch; and
    tutorial.py prints what the blog prints, in its order."""
    assert tutorial.main(["--epochs", "1", "--checkpoint-dir", tmp_path, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[:2] == ["cpu", "-------------------第1轮训练开始-------------------"]
    assert [line.split("，")[0] for line in lines[2:11]] == [f"训练次数{step}" for step in range(100, 901, 100)]
    assert all(float(line.split("loss:")[1]) > 0 for line in lines[2:11])  # one batch's loss.item(), unrounded
    assert (
        lines[11].startswith("第1轮训练结束！loss:") and lines[12] == "-------------------第1轮测试开始----------------"
    )
    assert lines[13].startswith("测试数据成功的概率为: ") and lines[14:] == ["第1训练轮模型已保存！"]
    code, ours_out, _ = run_main(
        train, ["--epochs", "1", "--checkpoint-dir", tmp_path / "ours", "--device", "cpu"], capsys
    )
    assert code == 0 and ours_out.startswith("training with the fast step")
    assert f"test accuracy {lines[13].split(': ')[1]}" in ours_out  # the same accuracy, to the hundredth
    for script, printed in (("tutorial.py", out), ("train.py", ours_out)):  # the lines bench.py --whole times
        lines = printed.splitlines()
        steps = [int(match.group(1)) for match in map(bench.STEP_LINE[script].search, lines) if match]
        assert steps == list(range(100, 901, 100)) and sum(map(bool, map(bench.EPOCH_DONE[script].search, lines))) == 1
    theirs = torch.load(tmp_path / "noteLearning_1.pth", weights_only=False).state_dict()  # the blog saves the model
    ours = torch.load(tmp_path / "ours" / "noteLearning_1.pth", weights_only=True)["model"]
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)


def test_without_bias_correction_adam_is_corrected_adam_times_a_factor_of_t_alone():
    """For any gradients (eps = 0), the uncorrected update is the corrected one times
    (1 - beta1^t) / sqrt(1 - beta2^t): 3.16x at t = 1, about 6.6x around t = 12, 1.28x at t = 938."""
    generator = torch.Generator().manual_seed(0)
    corrected = torch.randn(50, dtype=torch.float64, generator=generator)
    uncorrected = corrected.clone()
    states = [(torch.zeros(50, dtype=torch.float64), torch.zeros(50, dtype=torch.float64)) for _ in range(2)]
    for t in range(1, 301):
        grad = torch.randn(50, dtype=torch.float64, generator=generator) * (1 + t % 7)  # no steady gradient
        before = (corrected.clone(), uncorrected.clone())
        multiplier = (1 - 0.9**t) / math.sqrt(1 - 0.999**t)
        mnist_mlp.adam_update(corrected, grad, *states[0], t, lr=1e-3 * multiplier, eps=0.0)
        mnist_mlp.adam_update(uncorrected, grad, *states[1], t, lr=1e-3, eps=0.0, bias_correction=False)
        torch.testing.assert_close(corrected - before[0], uncorrected - before[1], rtol=1e-9, atol=0)
        corrected.copy_(uncorrected)  # the same point for the next step's comparison
    assert max((1 - 0.9**t) / math.sqrt(1 - 0.999**t) for t in range(1, 100)) == pytest.approx(6.57, abs=0.01)


BLOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "blog", "tutorial.md")


@pytest.mark.skipif(not os.path.exists(BLOG), reason="the blog's text lies beside the project only on its own machines")
def test_tutorial_py_holds_the_blogs_lines_in_the_blogs_order():
    """Every line of the blog's program is a line of tutorial.py, in the blog's order (NoteModel after the data,
    before the model is made), but for the five that tutorial.py changes, each marked "added"."""
    with open(BLOG, encoding="utf-8") as file:
        blog = file.read().split("```python\n")[1].split("```")[0]
    with open(tutorial.__file__, encoding="utf-8") as file:
        ours = [line.strip() for line in file]
    position, changed = 0, []
    for line in filter(None, (line.strip() for line in blog.splitlines())):
        if line in ours[position:]:
            position = ours.index(line, position) + 1
        else:
            changed.append(line.split("(")[0])
    assert changed == [
        "train_dataset = datasets.MNIST",
        "text_dataset = datasets.MNIST",
        "train_loader = data.DataLoader",
        "epoch = 20",
        "torch.save",
    ]  # the data folder, the seeded shuffle, --epochs, tutorial_run/
