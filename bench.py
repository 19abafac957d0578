"""Training speed of the tutorial's pipeline, ours, the autograd step and the matmul floor: python bench.py

All run the same number of steps of batch 64 on the same device, in one process:
  classic   torchvision ToTensor()+Normalize per image, DataLoader(batch_size=64, shuffle=True),
            autograd and the default Adam, as the tutorial writes it;
  ours      train.py's loop as it runs by default: the fast step, data resident, denormals flushed,
            and Adam's for-loop arithmetic over flat buffers (bit-identical to the tutorial's);
  fused     the same with torch's fused Adam kernel (train.py --fused --no-cuda-graph): what the
            exact Adam costs is ours minus fused;
  autograd  train.py's loop with the textbook step (what --step autograd and edited models run);
  floor     only the forward and backward matrix multiplications of the same shapes;
  graph     (CUDA only) fused replayed as one CUDA graph a step: train.py --fused on CUDA.
Each first runs --warmup-epochs untimed epochs, so the figures are the steady state that a
20-epoch run lives in (Adam's state turns denormal after about two epochs, which slows x86);
the first of those epochs is also timed and reported on its own.
A benchmark, not a test: nothing here asserts anything.
"""

import json
import os
import platform
import tempfile
import time

import commands

STEPS_PER_EPOCH = 938  # 60000 images in batches of 64: 937 full ones and one of 32
PIPELINES = ["classic", "ours", "fused", "autograd", "floor", "graph"]  # graph: fused replayed as a CUDA graph (CUDA only)


def parse_args(argv):
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0])
    commands.add_device_flag(parser)
    parser.add_argument("--steps", type=commands.bounded_int(1, 100 * STEPS_PER_EPOCH), default=STEPS_PER_EPOCH,
                        help="timed steps in the steady state (938 = one epoch)")
    parser.add_argument("--warmup-epochs", type=commands.bounded_int(0, 100), default=2,
                        help="untimed epochs before the timed steps; the first is timed on its own")
    parser.add_argument("--threads", type=commands.bounded_int(1, os.cpu_count() or 1), default=1,
                        help="torch CPU threads")
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=None,
                        help="which to time (default: all; graph only on CUDA)")
    commands.add_data_dir_flag(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--tutorial-epochs", type=commands.bounded_int(1, 1000), metavar="N",
                        help="instead, run tutorial.py's whole program for N epochs "
                             "(time it with /usr/bin/time to compare with train.py)")
    return parser.parse_args(argv)


if __name__ == "__main__":  # the flags first: --help and a mistyped flag answer before torch loads
    commands.flags_first(parse_args)

import torch  # noqa: E402  (after the flags, on purpose)
from torch import nn  # noqa: E402

import data_files  # noqa: E402
import fast_step  # noqa: E402
import mnist_mlp  # noqa: E402
import tutorial  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def batch_sizes(n, batch_size, steps):
    """The batch size of each of `steps` steps, epoch after epoch (the last batch of an epoch is short)."""
    per_epoch = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    return (per_epoch * (steps // len(per_epoch) + 1))[:steps]


def classic_runner(data_dir, device):
    """run(count): `count` more steps of the tutorial's pipeline (tutorial.py's pieces), epoch after epoch."""
    train_loader, _ = tutorial.make_loaders(data_dir, seed=1)
    model, criterion, optimizer = tutorial.make_model(seed=1)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)  # made again: the model may have moved

    def batches():
        while True:
            yield from train_loader

    batch_iterator = batches()

    def run(count):
        for _ in range(count):
            images, labels = next(batch_iterator)
            tutorial.train_step(model, criterion, optimizer, images.to(device), labels.to(device))
    return run


def train_py_runner(data_dir, device, step_choice, fused=False, graph=False):
    """run(count): `count` more steps of train.py's loop with --step step_choice (--fused: torch's fused
    Adam; graph: the fused step replayed as a CUDA graph)."""
    train_split, _ = data_files.load(data_dir, download=False)
    train_split = train_split.to(device)
    torch.manual_seed(1)
    model = mnist_mlp.NoteModel().to(device)
    optimizer = fast_step.make_optimizer("adam", model.parameters(), 0.001, fused=fused)
    step, _ = fast_step.make_train_step(model, nn.CrossEntropyLoss(), optimizer, step_choice, cuda_graph=graph)
    generator = torch.Generator().manual_seed(1)

    def run(count):
        while count > 0:
            order = mnist_mlp.epoch_order(len(train_split), generator)[:count * 64].to(device)
            result = mnist_mlp.train_epoch(step, train_split, order.split(64), log_interval=100)
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


def cpu_name():
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    return commands.run_main(run, argv)


def run(argv):
    """bench.py's work: the flags checked, then the timings; its errors and Ctrl-C as every script's."""
    args = parse_args(argv)
    device = commands.resolve_device(args.device)
    data_files.load(args.data_dir, download=False)  # decompress and check before timing
    if args.pipelines is None:
        args.pipelines = [name for name in PIPELINES if name != "graph" or device.type == "cuda"]
    if "graph" in args.pipelines and device.type != "cuda":
        raise commands.UsageError("the graph pipeline needs --device cuda")
    if args.tutorial_epochs:
        with tempfile.TemporaryDirectory() as checkpoint_dir:
            started = time.perf_counter()
            tutorial.main(["--epochs", args.tutorial_epochs, "--data-dir", args.data_dir,
                           "--checkpoint-dir", checkpoint_dir])
        print(f"tutorial program: {args.tutorial_epochs} epochs in {time.perf_counter() - started:.1f} s")
        return 0

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with fast_step.denormals_flushed():  # as train.py trains; the classic pipeline is timed without
            runners = {"ours": lambda: train_py_runner(args.data_dir, device, "fast"),
                       "fused": lambda: train_py_runner(args.data_dir, device, "fast", fused=True),
                       "autograd": lambda: train_py_runner(args.data_dir, device, "autograd"),
                       "floor": lambda: floor_runner(device),
                       "graph": lambda: train_py_runner(args.data_dir, device, "fast", fused=True, graph=True)}
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
    if "fused" in seconds and "ours" in seconds:
        report["exact_adam_extra_ms_per_step"] = round(1000 * (seconds["ours"] - seconds["fused"]) / args.steps, 4)
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
    commands.script(main)
