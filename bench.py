"""Training speed of the tutorial's pipeline, ours, the autograd step and the matmul floor: python bench.py

All run the same number of steps of batch 64 on the same device, in one process:
  classic   torchvision ToTensor()+Normalize per image, DataLoader(batch_size=64, shuffle=True),
            autograd and the default Adam, as the tutorial writes it;
  ours      train.py's loop with the fast step (data resident, flat fused Adam, denormals flushed;
            on CUDA without the graph, as train.py --no-cuda-graph);
  autograd  train.py's loop with the textbook step (what --step autograd and edited models run);
  floor     only the forward and backward matrix multiplications of the same shapes;
  graph     (CUDA only) ours replayed as one CUDA graph a step: what train.py runs on CUDA.
Each first runs --warmup-epochs untimed epochs, so the figures are the steady state that a
20-epoch run lives in (Adam's state turns denormal after about two epochs, which slows x86);
the first of those epochs is also timed and reported on its own.
A benchmark, not a test: nothing here asserts anything.
"""

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

import torch
from torch import nn

import mnist_mlp

STEPS_PER_EPOCH = 938  # 60000 images in batches of 64: 937 full ones and one of 32


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def batch_sizes(n, batch_size, steps):
    """The batch size of each of `steps` steps, epoch after epoch (the last batch of an epoch is short)."""
    per_epoch = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return (per_epoch * (steps // len(per_epoch) + 1))[:steps]


def tutorial_pipeline(data_dir, device):
    """The tutorial's pieces: per-image transforms, a shuffling DataLoader, the model, loss and Adam."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train_loader = torch.utils.data.DataLoader(datasets.MNIST(data_dir, train=True, transform=transform),
                                               batch_size=64, shuffle=True)
    test_set = datasets.MNIST(data_dir, train=False, transform=transform)
    model = mnist_mlp.NoteModel().to(device)
    return train_loader, test_set, model, nn.CrossEntropyLoss(), torch.optim.Adam(model.parameters(), lr=0.001)


def tutorial_step(model, criterion, optimizer, images, labels, device):
    """One step as the tutorial writes it, the loss read every step (loss.item(), a host sync)."""
    return mnist_mlp.textbook_step(model, criterion, optimizer, images.to(device), labels.to(device)).item()


def classic_runner(data_dir, device):
    """run(count): `count` more steps of the tutorial's pipeline, epoch after epoch."""
    loader, _, model, criterion, optimizer = tutorial_pipeline(data_dir, device)

    def batches():
        while True:
            yield from loader

    batch_iterator = batches()

    def run(count):
        for _ in range(count):
            tutorial_step(model, criterion, optimizer, *next(batch_iterator), device)
    return run


def train_py_runner(data_dir, device, step_choice, cuda_graph=False):
    """run(count): `count` more steps of train.py's loop with --step step_choice (as a CUDA graph or not)."""
    train_split, _ = mnist_mlp.load_dataset(data_dir, download=False)
    train_split = train_split.to(device)
    torch.manual_seed(1)
    model = mnist_mlp.NoteModel().to(device)
    optimizer = mnist_mlp.make_optimizer("adam", model.parameters(), 0.001)
    step, _ = mnist_mlp.make_train_step(model, nn.CrossEntropyLoss(), optimizer, step_choice, cuda_graph=cuda_graph)
    generator = torch.Generator().manual_seed(1)

    def run(count):
        while count > 0:
            order = mnist_mlp.epoch_order(len(train_split), generator)[:count * 64]
            result = mnist_mlp.train_epoch(step, train_split, order, 64, log_interval=100)
            count -= len(result.step_losses)
    return run


def floor_runner(device, hidden=(128, 64)):
    """run(count): only the matmuls of `count` steps: 3 forward, 3 weight gradients, 2 input gradients."""
    sizes = [784, *hidden, 10]
    weights = [torch.randn(n_out, n_in, device=device) for n_in, n_out in zip(sizes, sizes[1:])]
    activations = {}  # batch size -> random stand-ins for each layer's input and output
    position = [0]  # steps run so far, for the short last batch of each epoch

    def run(count):
        for batch in batch_sizes(60000, 64, position[0] + count)[position[0]:]:
            if batch not in activations:
                activations[batch] = [torch.randn(batch, n, device=device) for n in sizes]
            x = activations[batch]
            for index, weight in enumerate(weights):
                torch.mm(x[index], weight.t())            # forward
                torch.mm(x[index + 1].t(), x[index])      # weight gradient
                if index > 0:
                    torch.mm(x[index + 1], weight)        # gradient of the layer's input
        position[0] += count
    return run


def time_runner(run, device, steps, warmup_epochs):
    """(seconds of the first epoch or None, seconds of `steps` steps after warmup_epochs epochs)."""
    def timed(count):
        synchronize(device)
        started = time.perf_counter()
        run(count)
        synchronize(device)
        return time.perf_counter() - started

    first = timed(STEPS_PER_EPOCH) if warmup_epochs else None
    if warmup_epochs > 1:
        run(STEPS_PER_EPOCH * (warmup_epochs - 1))
    return first, timed(steps)


def tutorial_run(data_dir, device, epochs, checkpoint_dir):
    """The tutorial's whole program: train, log every 100 steps, test and save after each epoch."""
    train_loader, test_set, model, criterion, optimizer = tutorial_pipeline(data_dir, device)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000)
    for epoch in range(1, epochs + 1):
        running_loss = 0.0
        for step, (images, labels) in enumerate(train_loader, start=1):
            running_loss += tutorial_step(model, criterion, optimizer, images, labels, device)
            if step % 100 == 0:
                print(f"epoch {epoch} step {step} loss {running_loss / 100:.4f}")
                running_loss = 0.0
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += (model(images.to(device)).argmax(1) == labels.to(device)).sum().item()
        print(f"epoch {epoch} test accuracy {100 * correct / len(test_set):.2f}%", flush=True)
        torch.save(model.state_dict(), os.path.join(checkpoint_dir, f"noteLearning_{epoch}.pth"))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


PIPELINES = ["classic", "ours", "autograd", "floor", "graph"]  # graph: ours replayed as a CUDA graph (CUDA only)


def main(argv=None):
    parser = mnist_mlp.ArgumentParser(description=__doc__.splitlines()[0],
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--steps", type=mnist_mlp.bounded_int(1, 100 * STEPS_PER_EPOCH), default=STEPS_PER_EPOCH,
                        help="timed steps in the steady state (938 = one epoch)")
    parser.add_argument("--warmup-epochs", type=mnist_mlp.bounded_int(0, 100), default=2,
                        help="untimed epochs before the timed steps; the first is timed on its own")
    parser.add_argument("--threads", type=mnist_mlp.bounded_int(1, os.cpu_count() or 1), default=1,
                        help="torch CPU threads")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=None,
                        help="which to time (default: all; graph only on CUDA)")
    parser.add_argument("--data-dir", default=mnist_mlp.DEFAULT_DATA_DIR, help="dataset root folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--tutorial-epochs", type=mnist_mlp.bounded_int(1, 1000), metavar="N",
                        help="instead, run the tutorial's whole program for N epochs with torch's default "
                             "threads (time it with /usr/bin/time to compare with train.py)")
    try:
        args = parser.parse_args(argv)
        device = mnist_mlp.resolve_device(args.device)
        mnist_mlp.load_dataset(args.data_dir, download=False)  # decompress and check before timing
        if args.pipelines is None:
            args.pipelines = [name for name in PIPELINES if name != "graph" or device.type == "cuda"]
        if "graph" in args.pipelines and device.type != "cuda":
            raise mnist_mlp.UsageError("the graph pipeline needs --device cuda")
    except mnist_mlp.UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.tutorial_epochs:
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            started = time.perf_counter()
            tutorial_run(args.data_dir, device, args.tutorial_epochs, checkpoint_dir)
        print(f"tutorial program: {args.tutorial_epochs} epochs in {time.perf_counter() - started:.1f} s "
              f"({torch.get_num_threads()} threads)")
        return 0

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with mnist_mlp.denormals_flushed():  # as train.py trains; the classic pipeline is timed without
            runners = {"ours": lambda: train_py_runner(args.data_dir, device, "fast"),
                       "autograd": lambda: train_py_runner(args.data_dir, device, "autograd"),
                       "floor": lambda: floor_runner(device),
                       "graph": lambda: train_py_runner(args.data_dir, device, "fast", cuda_graph=True)}
            timings = {name: time_runner(runners[name](), device, args.steps, args.warmup_epochs)
                       for name in PIPELINES[1:] if name in args.pipelines}
        if "classic" in args.pipelines:
            timings = {"classic": time_runner(classic_runner(args.data_dir, device), device, args.steps,
                                              args.warmup_epochs), **timings}
    finally:
        torch.set_num_threads(threads_before)
    report = make_report(args, device, timings)
    if args.json:
        print(json.dumps(report, indent=2, allow_nan=False))
    else:
        print_report(args, report, timings)
    return 0


def make_report(args, device, timings):
    samples = sum(batch_sizes(60000, 64, args.steps))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}: {cpu_name()}",
        "threads": args.threads, "cpu_count": os.cpu_count(), "torch": str(torch.__version__),
        "steps": args.steps, "samples": samples, "warmup_epochs": args.warmup_epochs,
    }
    for name, (first, seconds) in timings.items():
        report[f"{name}_seconds"] = round(seconds, 4)
        report[f"{name}_samples_per_s"] = round(samples / seconds, 1)
        report[f"{name}_ms_per_step"] = round(1000 * seconds / args.steps, 4)
        if first is not None:
            report[f"{name}_first_epoch_samples_per_s"] = round(60000 / first, 1)
    seconds = {name: timing[1] for name, timing in timings.items()}
    if "classic" in seconds and "ours" in seconds:
        report["speedup"] = round(seconds["classic"] / seconds["ours"], 2)
    if "floor" in seconds and "ours" in seconds:
        report["floor_multiple"] = round(seconds["ours"] / seconds["floor"], 2)
    if "autograd" in seconds and "ours" in seconds:
        report["autograd_multiple"] = round(seconds["autograd"] / seconds["ours"], 2)
    if "classic" in seconds and "graph" in seconds:
        report["graph_speedup"] = round(seconds["classic"] / seconds["graph"], 2)
    return report


def print_report(args, report, timings):
    print(f"{report['device']}, {report['threads']} of {report['cpu_count']} threads, torch {report['torch']}, "
          f"{args.steps} steps of batch 64 after {args.warmup_epochs} warm-up epochs")
    print(f"{'pipeline':<10} {'samples/s':>12} {'ms/step':>9} {'first epoch samples/s':>22}")
    for name in timings:
        first = report.get(f"{name}_first_epoch_samples_per_s")
        print(f"{name:<10} {report[f'{name}_samples_per_s']:>12,.0f} {report[f'{name}_ms_per_step']:>9.3f} "
              f"{first if first is None else format(first, ',.0f'):>22}")
    if "speedup" in report:
        print(f"ours is {report['speedup']:.1f}x the classic pipeline")
    if "floor_multiple" in report:
        print(f"ours takes {report['floor_multiple']:.2f}x the floor's time per step")
    if "autograd_multiple" in report:
        print(f"the autograd step takes {report['autograd_multiple']:.2f}x ours")


if __name__ == "__main__":
    sys.exit(main())
