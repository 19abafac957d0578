"""study.py: the quick study runs end to end on a tiny dataset, writes its tables and figures, and a
second run reuses every run of the first."""

import pytest

import study
from tests.conftest import assert_usage_error, make_tiny_mnist, run_main


@pytest.mark.slow
def test_the_quick_study_writes_its_tables_and_reuses_its_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    data = make_tiny_mnist(tmp_path / "data")
    out = tmp_path / "study"
    argv = ["--quick", "--out", out, "--data-dir", data, "--val-size", "50"]
    code, printed, err = run_main(study, argv, capsys)
    assert code == 0 and err == ""
    progress = [line for line in printed.splitlines() if line.startswith("[")]
    assert len(progress) == 14 and progress[-1].startswith("[14/14]") and "test accuracy" in progress[0]
    report = (out / "study.md").read_text()
    for heading in (
        "Optimizers at the tutorial's settings",
        "Bias correction × learning rate",
        "each optimizer's lr chosen on validation",
        "Dead ReLU units",
        "AdamW",
        "How much test accuracy moves",
        "fit and generalisation",
        "What three seeds can show",
        "Inputs in [0, 1] against the tutorial's [−1, 1]",
    ):
        assert heading in report
    assert "| multiplier | 3.16 | 6.53 | 6.57 | 3.24 | 1.28 | 1.26 | 1.00 |" in report
    assert "Its mean over epoch 1 (steps 1–938): 2.04." in report and "β2 > 1−(1−β1)² = 0.99" in report
    assert "standard error of 0.16 points" in report and "p-value below 0.10" in report
    assert "seed 1 alone" in report and "after epoch 1 and 1" not in report and "last 10 epochs" not in report
    chosen_rows = report.split("fit and generalisation")[1].split("##")[0]
    assert chosen_rows.count("| adam, lr ") == 1 and chosen_rows.count("| sgd-momentum0.9, lr ") == 1
    for name in ("study_curves.png", "study_bias_correction.png", "study_fair.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(str(path.relative_to(out / "runs")) for path in (out / "runs").glob("*/*"))
    assert len(runs) == 14 and {run.split("/")[0] for run in runs} == {"epochs1-val0", "epochs1-val50"}
    code, printed, _ = run_main(study, argv, capsys)  # a study already done: every run is reused
    assert code == 0 and printed.count(": reused") == 14
    assert (out / "study.md").read_text() == report

    # a run is reused only where all of it matches: another --val-size makes its fair runs apart
    before = {path: path.stat().st_mtime_ns for path in (out / "runs").rglob("*")}
    code, printed, _ = run_main(study, ["--quick", "--out", out, "--data-dir", data, "--val-size", "60"], capsys)
    assert (
        code == 0
        and printed.count(": reused") == 14 - 4
        and "60 training images held out" in (out / "study.md").read_text()
    )
    assert all(path.stat().st_mtime_ns == when for path, when in before.items())  # the first study's runs untouched
    # a steps.json cut short (a kill mid-write) is a run to redo, not a crash
    steps = next((out / "runs").glob("epochs1-val0/bias-adam-lr0.001-1")) / "steps.json"
    steps.write_text("[0.5, 0.4")
    code, printed, _ = run_main(study, argv, capsys)
    assert code == 0 and printed.count(": reused") == 13 and study.read_steps(steps.parent) is not None
    # a folder holding a run of another description is refused whole, and left as it is
    description = steps.parent / study.RUN_DESCRIPTION
    description.write_text(description.read_text().replace('"seed": 1', '"seed": 7'))
    assert_usage_error(*run_main(study, argv, capsys)[::2], "bias-adam-lr0.001-1", "nothing was changed")
    assert '"seed": 7' in description.read_text()


def test_a_failed_write_under_out_is_exit_1(tmp_path, capsys, monkeypatch):
    import train

    monkeypatch.setattr(train, "main", lambda argv, on_epoch=None: 1)  # train.py's answer to a full disk
    code, _, err = run_main(study, ["--quick", "--out", tmp_path / "study"], capsys)
    assert code == 1 and err.startswith("error: ") and "could not write" in err


def test_study_needs_an_output_folder(tmp_path, capsys):
    assert_usage_error(*run_main(study, [], capsys)[::2], "--out")
    (tmp_path / "a-file").write_text("not a folder")
    assert_usage_error(*run_main(study, ["--out", tmp_path / "a-file", "--quick"], capsys)[::2], "--out", "a-file")


def test_the_optimizers_a_study_run_records_are_what_trained(tmp_path):
    """AdamW is recorded as itself, not as the Adam whose L2 decay it is compared with."""
    import torch

    import mnist_mlp
    from mnist_mlp_tools import fast_step

    model = mnist_mlp.NoteModel(8, 8)
    recorded = {
        kind: fast_step.optimizer_config(optimizer)["optimizer"]
        for kind, optimizer in (
            ("adamw", torch.optim.AdamW(model.parameters(), weight_decay=0.01)),
            ("adam", torch.optim.Adam(model.parameters(), weight_decay=0.01)),
            ("sgd", fast_step.make_optimizer("sgd", model.parameters(), {"lr": 0.01, "momentum": 0.9})),
        )
    }
    assert recorded == {"adamw": "adamw", "adam": "adam", "sgd": "sgd"}
