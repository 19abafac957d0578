"""train.py's choices that the other commands must honour: the input scaling (recorded in the checkpoint,
read back by evaluate, predict and draw) and the optimizers of the one registry (each one records itself,
resumes exactly, and refuses other settings)."""

import dataclasses
import json
import os
import re

import pytest
import torch

import draw
import evaluate
import mnist_mlp
import predict
import train
from mnist_mlp_tools import checkpoints, handwriting, models, optimizers
from tests.conftest import ROOT, assert_usage_error, run_main, tiny_run

DIGITS = os.path.join(ROOT, "data", "digits")


def offered(flag, capsys):
    """The choices train.py names for `flag` when given one it does not offer."""
    code, _, err = run_main(train, [flag, "no-such-choice"], capsys)
    assert code == 2
    return re.findall(r"'([^']+)'", err.split("choose from", 1)[1])


def test_train_offers_the_lessons_input_scalings_and_the_registrys_optimizers(capsys):
    assert offered("--inputs", capsys) == list(mnist_mlp.INPUT_SCALINGS)
    assert offered("--optimizer", capsys) == list(optimizers.OPTIMIZERS)
    assert_usage_error(
        *run_main(train, ["--optimizer", "adam-no-bias-correction", "--weight-decay", "0.01"], capsys)[::2],
        "--weight-decay",
        "adam-no-bias-correction",
    )
    with pytest.raises(ValueError, match="unknown input scaling 'other'"):
        mnist_mlp.normalize(torch.zeros(1, 784, dtype=torch.uint8), "other")


def test_a_zero_one_checkpoint_is_read_as_it_was_trained_by_every_command(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        train.main(
            [str(arg) for arg in tiny_run(tmp_path, "--epochs", "1", "--inputs", "zero-one", "--checkpoint-dir", out)]
        )
        == 0
    )
    path = str(out / "noteLearning_1.pth")
    checkpoint = checkpoints.load_checkpoint(path)
    assert checkpoint["config"]["inputs"] == "zero-one" and checkpoints.input_scaling(checkpoint) == "zero-one"
    model = models.model_from_checkpoint(path, checkpoint)
    _, test = mnist_mlp.load_dataset(str(tmp_path / "data"))
    as_trained = mnist_mlp.evaluate(model, dataclasses.replace(test, scaling="zero-one"))
    misread = mnist_mlp.evaluate(model, test)  # the tutorial's scaling: other inputs, another loss
    assert as_trained.loss != misread.loss
    capsys.readouterr()
    # evaluate.py: the figures train.py saved, from the scaling the checkpoint records
    code, printed, _ = run_main(evaluate, [path, "--data-dir", tmp_path / "data", "--json"], capsys)
    result = json.loads(printed)
    assert code == 0 and result["accuracy"] == round(checkpoint["metrics"]["test_accuracy"], 2)
    assert result["loss"] == pytest.approx(as_trained.loss, rel=1e-6)
    # predict.py and draw.py: a picture's probabilities from p / 255
    digit = os.path.join(DIGITS, sorted(os.listdir(DIGITS))[0])
    pixels = handwriting.digit_pixels(handwriting.decode_image(digit))
    expected = handwriting.class_probabilities(model.eval(), pixels, "zero-one")
    assert not torch.equal(expected, handwriting.class_probabilities(model, pixels, "tutorial"))
    code, printed, _ = run_main(predict, [path, digit, "--json"], capsys)
    assert code == 0 and json.loads(printed)["predictions"][0]["probability"] == round(float(expected.max()), 4)
    reader = draw.DigitReader(path)
    with open(digit, "rb") as file:
        assert reader.read(file.read())["probabilities"] == [float(value) for value in expected]
    # resuming with the other scaling is refused, naming the flag
    assert_usage_error(
        *run_main(train, [*tiny_run(tmp_path, "--epochs", "2", "--checkpoint-dir", out, "--resume", path)], capsys)[
            ::2
        ],
        "--inputs",
    )


@pytest.mark.parametrize(
    "name, extra",
    [
        ("adam", ["--weight-decay", "0.01"]),
        ("adamw", []),
        ("sgd", ["--weight-decay", "0.001"]),
        ("adam-no-bias-correction", []),
    ],
)
def test_every_optimizer_records_itself_resumes_and_refuses_other_settings(tmp_path, capsys, name, extra):
    out = tmp_path / "out"
    argv = [*tiny_run(tmp_path, "--optimizer", name, *extra, "--checkpoint-dir", out)]
    assert run_main(train, [*argv, "--epochs", "1"], capsys)[0] == 0
    config = checkpoints.load_checkpoint(str(out / "noteLearning_1.pth"))["config"]
    decay = {"adam": 0.01, "adamw": 0.01, "sgd": 0.001, "adam-no-bias-correction": 0}[name]  # AdamW's own default
    assert config["optimizer"] == name and config["weight_decay"] == decay
    assert set(optimizers.OPTIMIZERS[name].hyper_parameters) <= set(config)
    resume = [*argv, "--epochs", "2", "--resume", out / "noteLearning_1.pth"]
    assert run_main(train, resume, capsys)[0] == 0
    other = ["--weight-decay", "0.2"] if name != "adam-no-bias-correction" else ["--lr", "0.5"]
    code, _, err = run_main(
        train, [*resume[:-2], "--epochs", "3", *other, "--resume", out / "noteLearning_2.pth"], capsys
    )
    assert_usage_error(code, err, "other settings", other[0])
