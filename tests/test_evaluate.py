"""evaluate.py: the accuracy train.py printed, several checkpoints and the best, per-class figures, the
confusion matrix, the picture of errors, JSON without NaN, and eval mode."""

import dataclasses
import json
import sys

import pytest
import torch

import evaluate
import mnist_mlp
import train
from mnist_mlp_tools import checkpoints, commands, data_files, models, pictures
from tests.conftest import DropoutModel, assert_usage_error, run_main, tiny_run


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


def test_without_validation_images_no_best_is_chosen_on_the_test_set(trained, tmp_path, capsys):
    """Several runs that held nothing out: a row each, no row marked best (that would choose on the test set),
    and one line saying how to hold out a validation set."""
    folder, _ = trained
    worse = mnist_mlp.NoteModel().state_dict()  # untrained: about 10%
    torch.save(worse, tmp_path / "random.pth")
    code, out, _ = run_main(evaluate, [tmp_path / "random.pth", folder / "noteLearning_1.pth"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["checkpoint", "epoch", "accuracy", "correct", "loss"]
    assert "best" not in "".join(lines[:3]) and lines[3:] == [evaluate.NO_VALIDATION]
    assert "--val-size 5000" in lines[3] and "test accuracy" in lines[3]
    code, out, _ = run_main(evaluate, [tmp_path / "random.pth", folder / "noteLearning_1.pth", "--json"], capsys)
    assert [result["epoch"] for result in json.loads(out)] == [0, 1]


def test_per_class_and_confusion_agree_with_accuracy(trained, capsys):
    path = trained[0] / "noteLearning_1.pth"
    code, out, _ = run_main(evaluate, [path, "--json"], capsys)
    result = json.loads(out)
    confusion = torch.tensor(result["confusion"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == 10000
    assert int(confusion.trace()) == result["correct"]
    assert torch.equal(
        confusion.sum(1),
        torch.bincount(data_files.load(commands.DEFAULT_DATA_DIR, download=False)[1].labels, minlength=10),
    )
    per_class = (100 * confusion.diag() / confusion.sum(1)).tolist()
    assert result["per_class"] == [round(value, 2) for value in per_class]
    code, out, _ = run_main(evaluate, [path, "--per-class", "--confusion"], capsys)
    lines = out.splitlines()
    assert lines[1] == "accuracy per class:" and lines[2].split() == ["0", f"{result['per_class'][0]:.2f}%"]
    matrix_rows = lines[lines.index("confusion matrix (rows = true class, columns = predicted):") + 2 :]
    assert [int(value) for value in matrix_rows[3].split()[1:]] == result["confusion"][3]


def test_save_errors_writes_a_titled_png_grid_of_misclassified_images(trained, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "errors.png"
    checkpoint = trained[0] / "noteLearning_1.pth"
    code, out, _ = run_main(evaluate, [checkpoint, "--save-errors", path], capsys)
    assert (
        code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"saved misclassified examples to {path}" in out
    )
    with Image.open(path) as image:  # a two-line title, then 8 rows of 84-pixel digits with their captions
        assert image.format == "PNG" and image.size[1] == 52 + 8 * (28 * 3 + 22) and image.size[0] >= 8 * 28 * 3
    result = json.loads(run_main(evaluate, [checkpoint, "--json"], capsys)[1])
    model = models.model_from_checkpoint(str(checkpoint), checkpoints.load_checkpoint(str(checkpoint)), "cpu")
    _, test_split = data_files.load(commands.DEFAULT_DATA_DIR, download=False)
    grid, wrong = pictures.error_grid(model, test_split, result["classes"], "title")
    assert wrong == result["total"] - result["correct"] > 64  # "the first 64 of <wrong>"
    assert_usage_error(*run_main(evaluate, [checkpoint, "--save-errors", tmp_path / "errors.jpg"], capsys)[::2], ".png")


def test_the_confusion_heatmap_writes_the_jsons_counts_and_the_weights_box_the_silent_units(
    trained, tmp_path, capsys, monkeypatch
):
    pytest.importorskip("matplotlib")
    from PIL import Image

    checkpoint = trained[0] / "noteLearning_1.pth"
    drawn = {}
    real_save = pictures.save
    monkeypatch.setattr(
        pictures, "save", lambda picture, path: drawn.setdefault(str(path), picture) and real_save(picture, path)
    )
    heatmap, tiles = tmp_path / "confusion.png", tmp_path / "weights.png"
    code, out, _ = run_main(
        evaluate, [checkpoint, "--json", "--save-confusion", heatmap, "--save-weights", tiles], capsys
    )
    assert code == 0
    confusion = json.loads(out)["confusion"]
    for path, smallest, largest in ((heatmap, (500, 450), (2000, 2000)), (tiles, (800, 400), (3000, 2000))):
        with Image.open(path) as image:
            assert image.format == "PNG" and all(a <= b <= c for a, b, c in zip(smallest, image.size, largest)), (
                image.size
            )
    cells = {tuple(map(round, text.get_position())): int(text.get_text()) for text in drawn[str(heatmap)].axes[0].texts}
    assert cells == {(column, row): confusion[row][column] for row in range(10) for column in range(10)}
    # the boxed tiles are the units whose fc1 output is <= 0 on every test image, computed here apart
    model = models.model_from_checkpoint(str(checkpoint), checkpoints.load_checkpoint(str(checkpoint)), "cpu")
    _, test_split = data_files.load(commands.DEFAULT_DATA_DIR, download=False)
    with torch.no_grad():
        active = (model.fc1(mnist_mlp.normalize(test_split.pixels).view(-1, 784)) > 0).any(0)
    boxes = drawn[str(tiles)].axes[0].patches
    assert 0 < len(boxes) == int((~active).sum()) < 128
    assert {(round(box.get_x()) // 29) + 16 * (round(box.get_y()) // 29) for box in boxes} == set(
        (~active).nonzero().flatten().tolist()
    )


def test_pictures_say_in_one_line_what_they_need(trained, tmp_path, capsys, monkeypatch):
    checkpoint = trained[0] / "noteLearning_1.pth"
    assert_usage_error(
        *run_main(evaluate, [checkpoint, checkpoint, "--save-weights", tmp_path / "w.png"], capsys)[::2],
        "--save-weights takes exactly one checkpoint",
    )
    assert_usage_error(
        *run_main(
            evaluate, [checkpoint, "--save-weights", tmp_path / "a.png", "--save-confusion", tmp_path / "a.png"], capsys
        )[::2],
        "a file of its own",
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    for flag in ("--save-weights", "--save-confusion"):
        assert_usage_error(
            *run_main(evaluate, [checkpoint, flag, tmp_path / "x.png"], capsys)[::2],
            f"evaluate.py {flag} needs matplotlib",
            "pip install matplotlib",
        )
    assert not (tmp_path / "x.png").exists()
    code, _, _ = run_main(evaluate, [checkpoint, "--save-errors", tmp_path / "e.png"], capsys)  # PIL alone draws it
    assert code == 0 and (tmp_path / "e.png").exists()
    with pytest.raises(ValueError, match="needs a first layer nn.Linear\\(784, units\\); this model's first is Conv2d"):
        pictures.first_linear(
            torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(2704, 10))
        )


def test_save_errors_to_a_missing_folder_or_a_folder_fails_before_evaluating(trained, tmp_path, capsys):
    path = trained[0] / "noteLearning_1.pth"
    assert_usage_error(
        *run_main(evaluate, [path, "--save-errors", tmp_path / "nowhere" / "e.png"], capsys)[::2], "no folder"
    )
    (tmp_path / "dir.png").mkdir()
    assert_usage_error(*run_main(evaluate, [path, "--save-errors", tmp_path / "dir.png"], capsys)[::2], "folder")


def test_evaluate_json_never_prints_nan_and_picks_the_best_by_validation(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "out"
    assert (
        run_main(train, tiny_run(tmp_path, "--epochs", "2", "--val-size", "56", "--checkpoint-dir", folder), capsys)[0]
        == 0
    )
    results = [
        {"checkpoint": "a", "accuracy": 99.0, "loss": 0.1, "validation": {"accuracy": 80.0}},
        {"checkpoint": "b", "accuracy": 90.0, "loss": 0.2, "validation": {"accuracy": 85.0}},
    ]
    assert evaluate.best_index(results) == 1
    held_nothing_out = {key: value for key, value in results[1].items() if key != "validation"}
    assert evaluate.best_index([results[0], held_nothing_out]) is None  # never by the test accuracy of some
    code, out, _ = run_main(
        evaluate,
        [folder / "noteLearning_1.pth", folder / "noteLearning_2.pth", "--data-dir", tmp_path / "data"],
        capsys,
    )
    assert code == 0 and "<- best validation accuracy" in out
    real_evaluate = mnist_mlp.evaluate
    monkeypatch.setattr(
        mnist_mlp,
        "evaluate",
        lambda *args, **kwargs: dataclasses.replace(real_evaluate(*args, **kwargs), loss=float("inf")),
    )  # huge logits: cross-entropy overflows
    code, out, _ = run_main(
        evaluate, [folder / "noteLearning_1.pth", "--data-dir", tmp_path / "data", "--json"], capsys
    )
    assert code == 0 and json.loads(out)["loss"] is None
    for files in ([folder / "noteLearning_1.pth"], [folder / "noteLearning_1.pth", folder / "noteLearning_2.pth"]):
        code, out, err = run_main(evaluate, [*files, "--data-dir", tmp_path / "data"], capsys)  # the text report too
        assert code == 0 and "not finite" in out and err == ""


def test_a_checkpoint_with_finite_weights_whose_loss_overflows_is_reported(tmp_path, capsys):
    """Weights finite but so large that cross-entropy overflows: the report says so, no TypeError."""
    model = mnist_mlp.NoteModel()
    with torch.no_grad():
        model.fc3.weight.mul_(1e37)
    torch.save(model.state_dict(), tmp_path / "huge.pth")
    code, out, err = run_main(evaluate, [tmp_path / "huge.pth"], capsys)
    assert code == 0 and "mean loss not finite" in out and "Traceback" not in err


def test_evaluation_runs_in_eval_mode_and_gives_the_mode_back(mnist):
    _, test_split = mnist
    model = DropoutModel()
    small = mnist_mlp.Split(test_split.pixels[:500], test_split.labels[:500])
    first = mnist_mlp.evaluate(model.train(), small)
    assert model.training
    assert mnist_mlp.evaluate(model, small).loss == first.loss  # no dropout drawn: the same figures twice
    pictures.misclassified(model, small)
    assert model.training


def test_several_checkpoints_are_listed_in_epoch_order_with_what_the_best_is_chosen_by(tmp_path, capsys):
    import shutil

    folder = tmp_path / "out"
    assert (
        run_main(train, tiny_run(tmp_path, "--epochs", "2", "--val-size", "56", "--checkpoint-dir", folder), capsys)[0]
        == 0
    )
    shutil.copy(folder / "noteLearning_2.pth", folder / "noteLearning_10.pth")
    shell_order = [folder / f"noteLearning_{epoch}.pth" for epoch in (1, 10, 2)]  # what noteLearning_*.pth gives
    code, out, _ = run_main(evaluate, [*shell_order, "--data-dir", tmp_path / "data"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[-2:] == ["val", "acc."]
    assert [line.split()[0].rsplit("_", 1)[1] for line in lines[1:]] == ["1.pth", "2.pth", "10.pth"]
    best = next(line for line in lines if "<- best validation accuracy" in line)
    assert best.split()[-5].endswith("%")  # the validation accuracy it was chosen by is in the row
