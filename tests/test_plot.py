"""plot.py: seeds grouped into a mean with a band, and bad input as one-line errors."""

import sys

import pytest

from tests.conftest import assert_usage_error, run_main


def write_metrics_csv(folder, accuracies, losses=None, validation=False):
    folder.mkdir(parents=True)
    rows = ["epoch,train_loss,val_loss,val_accuracy,test_loss,test_accuracy,seconds,samples_per_s,checkpoint"]
    for epoch, accuracy in enumerate(accuracies, start=1):
        loss = losses[epoch - 1] if losses else 1.0 / epoch
        val = f"{0.6 / epoch},{accuracy - 1}" if validation else ","
        rows.append(f"{epoch},{loss},{val},0.5,{accuracy},1.0,60000,noteLearning_{epoch}.pth")
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_plot_groups_seeds_into_a_mean_with_a_band(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot

    runs = [
        write_metrics_csv(tmp_path / "adam-1", [90, 94, 96]),
        write_metrics_csv(tmp_path / "adam-2", [92, 95, 97]),
        write_metrics_csv(tmp_path / "sgd", [80, 85, 88]),
    ]
    groups = plot.group_by_setting([plot.read_run(str(run)) for run in runs])
    assert list(groups) == ["adam", "sgd"] and len(groups["adam"]) == 2
    assert plot.spread(groups["adam"], "test_accuracy") == (
        [1, 2, 3],
        [91.0, 94.5, 96.5],
        [90.0, 94.0, 96.0],
        [92.0, 95.0, 97.0],
    )
    output = tmp_path / "curves.png"
    code, out, _ = run_main(plot, [*runs, runs[2] / "metrics.csv", "-o", output], capsys)
    assert code == 0 and "4 runs in 2 settings" in out
    from PIL import Image

    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (1100, 462)  # on every matplotlib


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


def test_plot_odd_runs_titles_and_failures(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import plot
    from mnist_mlp_tools import safe_files

    apart = [write_metrics_csv(tmp_path / "a-1", [90, 91]), tmp_path / "a-2"]
    (tmp_path / "a-2").mkdir()
    (tmp_path / "a-2" / "metrics.csv").write_text(
        "epoch,train_loss,val_loss,val_accuracy,test_loss,test_accuracy,seconds,samples_per_s,checkpoint\n"
        "7,0.1,,,0.5,95,1.0,60000,noteLearning_7.pth\n"
    )
    assert_usage_error(*run_main(plot, [*apart, "-o", tmp_path / "x.png"], capsys)[::2], "share no epoch")
    odd = [write_metrics_csv(tmp_path / "cost$5", [90, 92]), write_metrics_csv(tmp_path / "_x", [80, 85])]
    code, out, err = run_main(plot, [*odd, "--title", "costs in $ and $$", "-o", tmp_path / "odd.png"], capsys)
    assert code == 0 and err == "" and (tmp_path / "odd.png").read_bytes()[:4] == b"\x89PNG"
    assert plot.shown("_x") == " _x" and plot.shown("a$b") == "a\\$b"  # shown in the legend, not mathtext
    assert_usage_error(*run_main(plot, [odd[0], "--accuracy-from", "nan"], capsys)[::2], "--accuracy-from")
    (tmp_path / "model.pth").write_bytes(bytes(range(256)) * 4)  # a checkpoint given as a run
    assert_usage_error(*run_main(plot, [tmp_path / "model.pth"], capsys)[::2], "cannot read", "model.pth")

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safe_files, "atomic_write", full_disk)
    code, _, err = run_main(plot, [odd[0], "-o", tmp_path / "full.png"], capsys)
    assert code == 1 and err.startswith("error: cannot write") and err.count("\n") == 1


def test_plot_draws_test_and_validation_curves_and_names_the_current_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import plot

    held_out = write_metrics_csv(tmp_path / "held-out", [90, 94, 96], validation=True)
    plain = write_metrics_csv(tmp_path / "plain", [91, 93, 95])
    groups = plot.group_by_setting([plot.read_run(str(run)) for run in (held_out, plain)])
    figure = plot.draw(groups, str(tmp_path / "both.png"))
    accuracy, loss = figure.axes[:2]
    # test and validation accuracy for the run that held images out, test only for the other;
    # training, test (and validation) loss likewise
    assert [len(line.get_xdata()) for line in accuracy.lines] == [3, 3, 3]
    assert sorted(line.get_linestyle() for line in loss.lines) == ["-", "-", "--", "--", ":"]
    assert [text.get_text() for text in loss.get_legend().get_texts()] == [
        "training, mean over the epoch",
        "test",
        "validation",
    ]
    assert figure.get_suptitle() == "Training curves of held-out and plain"
    monkeypatch.chdir(held_out)  # a run given as "." is labelled by its folder's name
    assert plot.read_run(".")[0] == "held-out"
    code, out, _ = run_main(plot, [".", "-o", tmp_path / "here.png"], capsys)
    assert code == 0 and (tmp_path / "here.png").exists()
