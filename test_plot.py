"""plot.py: seeds grouped into a mean with a band, and bad input as one-line errors."""

import sys

import pytest

from conftest import assert_usage_error, run_main


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
