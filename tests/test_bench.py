"""bench.py's flags (its timings are figures, not assertions; the CUDA run is in test_cuda.py)."""

from tests.conftest import assert_usage_error, run_main


def test_bench_refuses_absurd_warmups(capsys):
    import bench

    assert_usage_error(*run_main(bench, ["--warmup-epochs", str(10**20)], capsys)[::2], "--warmup-epochs")
    assert_usage_error(*run_main(bench, ["--steps", "0"], capsys)[::2], "--steps")


def test_bench_without_warm_up_times_the_first_epoch_as_the_steady_one(capsys):
    import bench

    code, out, _ = run_main(bench, ["--warmup-epochs", "0", "--steps", "3", "--pipelines", "floor", "ours"], capsys)
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:4]}
    assert set(rows) == {"ours", "floor"} and all(row[2] == "-" for row in rows.values())  # no first epoch timed


def test_bench_whole_reports_medians_extrapolated_to_20_epochs(monkeypatch, capsys):
    import bench

    timings = iter(
        [
            {"start_up_s": 2.0, "steady_epoch_s": 1.0, "finished_s": 5.0},  # train.py, three runs
            {"start_up_s": 4.0, "steady_epoch_s": 9.0, "finished_s": 31.0},  # tutorial.py
            {"start_up_s": 2.5, "steady_epoch_s": 1.2, "finished_s": 6.0},
            {"start_up_s": 4.0, "steady_epoch_s": 10.0, "finished_s": 34.0},
            {"start_up_s": 9.0, "steady_epoch_s": 0.9, "finished_s": 5.0},
            {"start_up_s": 3.0, "steady_epoch_s": 8.0, "finished_s": 30.0},
        ]
    )
    monkeypatch.setattr(bench, "time_program", lambda script, epochs, data_dir: next(timings))
    monkeypatch.setattr(bench, "torch_start_up", lambda repeats: (2.5, 1.5))
    code, out, _ = run_main(bench, ["--whole", "--json"], capsys)
    report = __import__("json").loads(out)
    assert code == 0 and report["epochs_run"] == 3 and report["repeats"] == 3
    assert report["train_start_up_s"] == 2.5 and report["train_steady_epoch_s"] == 1.0
    assert report["train_whole_20_epochs_s"] == 5.0 + 17 * 1.0  # the median run, 17 more epochs
    assert report["tutorial_whole_20_epochs_s"] == 31.0 + 17 * 9.0
    assert report["whole_run_ratio"] == round((31.0 + 17 * 9.0) / 22.0, 2)
    assert report["import_torch_s"] == 2.5 and report["first_torch_optimizer_s"] == 1.5
