"""bench.py's flags (its timings are figures, not assertions; the CUDA run is in test_cuda.py)."""

from conftest import assert_usage_error, run_main


def test_bench_refuses_absurd_warmups(capsys):
    import bench
    assert_usage_error(*run_main(bench, ["--warmup-epochs", str(10**20)], capsys)[::2], "--warmup-epochs")
    assert_usage_error(*run_main(bench, ["--steps", "0"], capsys)[::2], "--steps")
