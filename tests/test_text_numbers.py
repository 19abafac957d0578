"""Numbers read from text are ASCII only: int() reads "٣" and "３" as 3, str.isdigit() is true of "²"
(which int() refuses), and a regex's \\d matches all three. One rule (commands.whole_number,
decimal_number, re.ASCII), checked here on every reader: file names, metrics.csv, HTTP headers."""

import http.client

import pytest

import evaluate
import predict
from mnist_mlp_tools import commands, run_folder
from tests.conftest import assert_usage_error, run_main

NOT_ASCII = ["٣", "３", "²", "3²", "໓"]  # Arabic-Indic, fullwidth, superscript, Lao


@pytest.mark.parametrize("text", NOT_ASCII)
def test_the_rule_takes_ascii_digits_only(text):
    assert commands.whole_number(text) is None and commands.decimal_number(text) is None
    assert commands.whole_number("30") == 30 and commands.decimal_number("-1.5e2") == -150.0
    assert commands.decimal_number("nan") is None and commands.decimal_number("1e400") is None


@pytest.mark.parametrize("text", NOT_ASCII)
def test_file_names_with_other_digits_are_no_epoch_and_no_label(text, tmp_path):
    (tmp_path / f"noteLearning_{text}.pth").write_bytes(b"x")
    (tmp_path / "noteLearning_3.pth").write_bytes(b"x")
    assert list(run_folder.checkpoint_epochs(str(tmp_path))) == [3]
    assert predict.true_label(f"{text}_pen.png", [str(d) for d in range(10)]) is None
    assert sorted([f"noteLearning_{text}.pth", "noteLearning_2.pth"], key=evaluate.natural_order)  # no ValueError


@pytest.mark.parametrize("text", NOT_ASCII)
def test_a_metrics_csv_with_other_digits_is_refused_in_one_line(text, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot

    folder = tmp_path / "run"
    folder.mkdir()
    header = ",".join(run_folder.METRICS_FIELDS)
    row = {field: "" for field in run_folder.METRICS_FIELDS} | {
        "epoch": text,
        "train_loss": "0.3",
        "test_accuracy": "90",
    }
    (folder / "metrics.csv").write_text(
        header + "\n" + ",".join(row[field] for field in run_folder.METRICS_FIELDS) + "\n"
    )
    with pytest.raises(commands.UsageError, match="cannot read"):
        run_folder.read_metrics(str(folder / "metrics.csv"))
    assert_usage_error(*run_main(plot, [folder, "-o", tmp_path / "x.png"], capsys)[::2], "epoch", "not a whole number")
    row |= {"epoch": "1", "test_accuracy": "9" + text}
    (folder / "metrics.csv").write_text(
        header + "\n" + ",".join(row[field] for field in run_folder.METRICS_FIELDS) + "\n"
    )
    assert_usage_error(*run_main(plot, [folder, "-o", tmp_path / "x.png"], capsys)[::2], "test_accuracy")


@pytest.mark.parametrize("value", ["1e308", "-1e308", "101", "-0.5"])
def test_plot_refuses_figures_no_run_can_have(value, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import plot

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.csv").write_text(f"epoch,train_loss,test_accuracy\n1,0.5,{value}\n")
    assert_usage_error(
        *run_main(plot, [folder, "-o", tmp_path / "x.png"], capsys)[::2], "test_accuracy", "from 0 to 100"
    )


@pytest.mark.parametrize("length", NOT_ASCII + ["-1", "1e3", ""])
def test_a_content_length_in_other_digits_gets_a_json_411(length, server):
    connection = http.client.HTTPConnection(*server, timeout=10)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Length", length.encode())
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 411 and b"ASCII digits" in response.read()
    connection.close()
