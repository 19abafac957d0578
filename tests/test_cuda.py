"""On CUDA (skipped without a GPU): the fast step against autograd, a real epoch, resuming, bench."""

import json

import pytest
import torch

import evaluate
import mnist_mlp
import train
from tests.conftest import make_step, run_main, tiny_run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_cuda_fast_step_equals_the_autograd_step_to_float_rounding(mnist):
    train_split, _ = mnist
    train_split = train_split.to("cuda")
    models = []
    for choice in ("fast", "autograd"):
        torch.manual_seed(4)
        model = mnist_mlp.NoteModel().cuda()
        step, description = make_step(model, choice)
        assert description.startswith(choice)
        order = mnist_mlp.epoch_order(len(train_split), torch.Generator().manual_seed(4))
        mnist_mlp.train_epoch(step, train_split, order[: 40 * 64].to("cuda").split(64))
        models.append(model)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_one_epoch_reaches_90_percent_and_evaluates_the_same_on_the_cpu(fused, tmp_path, capsys):
    argv = ["--epochs", "1", "--device", "cuda", "--checkpoint-dir", tmp_path] + (["--fused"] if fused else [])
    code, out, _ = run_main(train, argv, capsys)
    assert code == 0 and out.splitlines()[0].startswith("training with the fast step")
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy >= 90.0
    results = {}
    for device in ("cuda", "cpu"):
        code, out, _ = run_main(evaluate, [tmp_path / "noteLearning_1.pth", "--device", device, "--json"], capsys)
        results[device] = json.loads(out)
    assert f"{results['cuda']['accuracy']:.2f}" == f"{accuracy:.2f}"
    assert abs(results["cpu"]["correct"] - results["cuda"]["correct"]) <= 2  # GPU and CPU round differently


@needs_cuda
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_resume_continues_exactly(fused, tmp_path, capsys):
    flags = ["--device", "cuda"] + (["--fused"] if fused else [])
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(train, tiny_run(tmp_path, "--epochs", "3", "--checkpoint-dir", straight, *flags), capsys)[0] == 0
    assert run_main(train, tiny_run(tmp_path, "--epochs", "1", "--checkpoint-dir", split, *flags), capsys)[0] == 0
    assert (
        run_main(
            train,
            tiny_run(
                tmp_path, "--epochs", "3", "--checkpoint-dir", split, *flags, "--resume", split / "noteLearning_1.pth"
            ),
            capsys,
        )[0]
        == 0
    )
    a = torch.load(straight / "noteLearning_3.pth", weights_only=True)["model"]
    b = torch.load(split / "noteLearning_3.pth", weights_only=True)["model"]
    assert all(torch.equal(a[key], b[key]) for key in a)


@needs_cuda
def test_bench_runs_on_cuda(capsys):
    import bench

    code, out, _ = run_main(
        bench,
        [
            "--device",
            "cuda",
            "--steps",
            "50",
            "--warmup-epochs",
            "0",
            "--json",
            "--pipelines",
            "ours",
            "autograd",
            "floor",
        ],
        capsys,
    )
    report = json.loads(out)
    assert code == 0 and report["ours_samples_per_s"] > 0 and report["autograd_samples_per_s"] > 0
