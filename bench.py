"""Training speed of the tutorial's pipeline, ours, the autograd step and the matmul floor: python bench.py

All run the same number of steps of batch 64 on the same device, in one process:
  classic   torchvision ToTensor()+Normalize per image, DataLoader(batch_size=64, shuffle=True),
            autograd and the default Adam, as the tutorial writes it;
  ours      train.py's loop as it runs by default: the fast step, data resident, denormals flushed,
            and Adam's for-loop arithmetic over flat buffers (bit-identical to the tutorial's);
  fused     the same with torch's fused Adam kernel (train.py --fused): what the exact Adam costs
            is ours minus fused;
  autograd  train.py's loop with the textbook step (what --step autograd and edited models run);
  floor     only the forward and backward matrix multiplications of the same shapes.
Each first runs --warmup-epochs untimed epochs, so the figures are the steady state that a
20-epoch run lives in (Adam's state turns denormal after about two epochs, which slows x86);
the first of those epochs is also timed and reported on its own.
--whole times the whole programs instead, as a user runs them: `python train.py` and
`python tutorial.py` in fresh processes, interleaved, each for a few epochs, with start-up (process
start to the first step), the steady epoch (train, test, save) and the 20-epoch run extrapolated.
A benchmark, not a test: nothing here asserts anything.
"""

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

from mnist_mlp_tools import commands

torch, torchvision, mnist_mlp, tutorial, data_files, fast_step = commands.lazy_import(
    "torch", "torchvision", "mnist_mlp", "tutorial", "mnist_mlp_tools.data_files", "mnist_mlp_tools.fast_step"
)

STEPS_PER_EPOCH = 938  # 60000 images in batches of 64: 937 full ones and one of 32
HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINES = ["classic", "ours", "fused", "autograd", "floor"]


def parse_args(argv):
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0])
    commands.add_device_flag(parser)
    parser.add_argument(
        "--steps",
        type=commands.bounded_int(1, 100 * STEPS_PER_EPOCH),
        default=STEPS_PER_EPOCH,
        help="timed steps in the steady state (938 = one epoch)",
    )
    parser.add_argument(
        "--warmup-epochs",
        type=commands.bounded_int(0, 100),
        default=2,
        help="untimed epochs before the timed steps; the first is timed on its own",
    )
    parser.add_argument(
        "--threads", type=commands.bounded_int(1, os.cpu_count() or 1), default=1, help="torch CPU threads"
    )
    parser.add_argument(
        "--optimizer",
        choices=["adam", "sgd"],
        default="adam",
        help="train.py's optimizer in ours, fused and autograd: adam (lr 0.001) or sgd (momentum 0.9, "
        "lr 0.01); the classic pipeline is always the blog's Adam",
    )
    parser.add_argument(
        "--pipelines",
        nargs="+",
        choices=PIPELINES,
        default=None,
        help="which to time (default: all)",
    )
    commands.add_data_dir_flag(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    whole = parser.add_argument_group("the whole program (--whole): python train.py against python tutorial.py")
    whole.add_argument(
        "--whole",
        action="store_true",
        help="instead of the steps, time both whole programs as a user runs them, interleaved, and "
        "extrapolate to 20 epochs: start-up, steady epoch and whole run of each",
    )
    whole.add_argument(
        "--whole-epochs",
        type=commands.bounded_int(2, 1000),
        default=3,
        metavar="N",
        help="epochs each program runs (the first holds the start-up; the others give the steady epoch)",
    )
    whole.add_argument(
        "--repeats", type=commands.bounded_int(1, 100), default=3, help="runs of each program; the medians are reported"
    )
    return parser.parse_args(argv)


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
    """steps(count): `count` more steps of the blog's pipeline, epoch after epoch: tutorial.py's transforms,
    DataLoader, NoteModel, loss, Adam and step, as its blog_data() and blog_training() write them (the loss read
    every 100 steps)."""
    transforms = torchvision.transforms
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    train_loader = torch.utils.data.DataLoader(
        dataset=torchvision.datasets.MNIST(data_dir, transform=transform, train=True),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(1),
    )
    torch.manual_seed(1)
    model = tutorial.NoteModel().to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    position = [0]

    def batches():
        while True:
            yield from train_loader

    batch_iterator = batches()

    def steps(count):
        for _ in range(count):
            inputs, labels = next(batch_iterator)
            inputs, labels = inputs.to(device), labels.to(device)
            outs = model(inputs)
            loss = loss_fn(outs, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            position[0] += 1
            if position[0] % 100 == 0:
                loss.item()

    steps.optimizer = opt
    return steps


def train_py_runner(data_dir, device, step_choice, fused=False, optimizer_name="adam"):
    """steps(count): `count` more steps of train.py's loop with --step step_choice (--fused: torch's fused
    optimizer), with train.py's default Adam or its --optimizer sgd (--momentum 0.9, --lr 0.01)."""
    train_split, _ = data_files.load(data_dir, download=False)
    train_split = train_split.to(device)
    torch.manual_seed(1)
    model = mnist_mlp.NoteModel().to(device)
    settings = {"optimizer": optimizer_name, "lr": 0.001 if optimizer_name == "adam" else 0.01, "momentum": 0.9}
    step, optimizer, _ = fast_step.make_training(
        model, torch.nn.CrossEntropyLoss(), {**settings, "fused": fused}, step_choice
    )
    generator = torch.Generator().manual_seed(1)

    def steps(count):
        while count > 0:
            order = mnist_mlp.epoch_order(len(train_split), generator)[: count * 64].to(device)
            result = mnist_mlp.train_epoch(step, train_split, order.split(64), log_interval=100)
            count -= len(result.step_losses)

    steps.optimizer = optimizer
    return steps


def floor_runner(device, hidden=(128, 64)):
    """steps(count): only the matmuls of `count` steps: 3 forward, 3 weight gradients, 2 input gradients."""
    sizes = [784, *hidden, 10]
    weights = [torch.randn(n_out, n_in, device=device) for n_in, n_out in zip(sizes, sizes[1:])]
    activations = {}  # batch size -> random stand-ins for each layer's input and output
    position = [0]  # steps run so far, for the short last batch of each epoch

    def steps(count):
        for batch in batch_sizes(60000, 64, position[0] + count)[position[0] :]:
            if batch not in activations:
                activations[batch] = [torch.randn(batch, n, device=device) for n in sizes]
            x = activations[batch]
            for index, weight in enumerate(weights):
                torch.mm(x[index], weight.t())  # forward
                torch.mm(x[index + 1].t(), x[index])  # weight gradient
                if index > 0:
                    torch.mm(x[index + 1], weight)  # gradient of the layer's input
        position[0] += count

    return steps


def time_steps(take_steps, device, count, warmup_epochs):
    """(seconds of the first epoch or None, seconds of `count` steps after warmup_epochs epochs, bytes of
    the optimizer's state at the end or None)."""

    def timed(number):
        synchronize(device)
        started = time.perf_counter()
        take_steps(number)
        synchronize(device)
        return time.perf_counter() - started

    first = timed(STEPS_PER_EPOCH) if warmup_epochs else None
    if warmup_epochs > 1:
        take_steps(STEPS_PER_EPOCH * (warmup_epochs - 1))
    seconds = timed(count)
    optimizer = getattr(take_steps, "optimizer", None)
    state = (
        None
        if optimizer is None
        else sum(
            value.numel() * value.element_size()
            for values in optimizer.state.values()
            for key, value in values.items()
            if isinstance(value, torch.Tensor) and key != "step"
        )
    )
    return first, seconds, state


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
    return commands.run_main(measure, argv)


def measure(argv):
    """bench.py's work: the flags checked, then the timings; its errors and Ctrl-C as every script's."""
    args = parse_args(argv)
    device = commands.resolve_device(args.device)
    data_files.load(args.data_dir, download=False)  # decompress and check before timing
    args.pipelines = args.pipelines or PIPELINES
    if args.whole:
        report = whole_programs(args)
        print(json.dumps(report, indent=2, allow_nan=False) if args.json else whole_text(report))
        return 0

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with fast_step.denormals_flushed():  # as train.py trains; the classic pipeline is timed without
            name = args.optimizer
            runners = {
                "ours": lambda: train_py_runner(args.data_dir, device, "fast", optimizer_name=name),
                "fused": lambda: train_py_runner(args.data_dir, device, "fast", fused=True, optimizer_name=name),
                "autograd": lambda: train_py_runner(args.data_dir, device, "autograd", optimizer_name=name),
                "floor": lambda: floor_runner(device),
            }
            timings = {
                name: time_steps(runners[name](), device, args.steps, args.warmup_epochs)
                for name in PIPELINES[1:]
                if name in args.pipelines
            }
        if "classic" in args.pipelines:
            timings = {
                "classic": time_steps(classic_runner(args.data_dir, device), device, args.steps, args.warmup_epochs),
                **timings,
            }
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
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "steps": args.steps,
        "samples": samples,
        "warmup_epochs": args.warmup_epochs,
        "optimizer": args.optimizer,
    }
    for name, (first, seconds, state) in timings.items():
        if state is not None:
            report[f"{name}_optimizer_state_bytes"] = state
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
    return report


def print_report(args, report, timings):
    print(
        f"{report['device']}, {report['threads']} of {report['cpu_count']} threads, torch {report['torch']}, "
        f"{args.steps} steps of batch 64 after {args.warmup_epochs} warm-up epochs"
    )
    print(f"{'pipeline':<10} {'samples/s':>12} {'ms/step':>9} {'first epoch samples/s':>22}")
    for name in timings:
        first = report.get(f"{name}_first_epoch_samples_per_s")
        print(
            f"{name:<10} {report[f'{name}_samples_per_s']:>12,.0f} {report[f'{name}_ms_per_step']:>9.3f} "
            f"{'-' if first is None else format(first, ',.0f'):>22}"
        )
    states = {
        name: report[f"{name}_optimizer_state_bytes"] for name in timings if f"{name}_optimizer_state_bytes" in report
    }
    if states:
        print("optimizer state: " + ", ".join(f"{name} {size:,} bytes" for name, size in states.items()))
    if "speedup" in report:
        print(f"ours is {report['speedup']:.1f}x the classic pipeline")
    if "floor_multiple" in report:
        print(f"ours takes {report['floor_multiple']:.2f}x the floor's time per step")
    if "autograd_multiple" in report:
        print(f"the autograd step takes {report['autograd_multiple']:.2f}x ours")


# ----------------------------------------------------------------------------- the whole program

# The lines each program prints: the loss every 100 steps (the step number in the group; those of epoch 1 count),
# and one line once an epoch is trained, tested and saved.
STEP_LINE = {"train.py": re.compile(r"^epoch 1/\d+  step (\d+)/"), "tutorial.py": re.compile(r"^训练次数(\d+)，loss:")}
EPOCH_DONE = {
    "train.py": re.compile(r"^epoch \d+/\d+  train loss"),
    "tutorial.py": re.compile(r"^第\d+训练轮模型已保存！"),
}
START_UP = (
    "import time; started = time.perf_counter(); import torch; imported = time.perf_counter(); "
    "torch.optim.Adam([torch.zeros(1, requires_grad=True)]); "
    "print(imported - started, time.perf_counter() - imported)"
)


def time_program(script, epochs, data_dir):
    """Run `python script --epochs N` as a user does, in a fresh process and a scratch folder: its
    start-up, its steady epoch and its exit, in seconds from the process's start.

    Start-up (process start to the first step) is read off epoch 1's loss lines: the time of the
    step-100 line less 100 steps at the pace between it and the last one. A steady epoch is the mean
    of epochs 2..N, each trained, tested and saved.
    """
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-u",
            os.path.join(HERE, script),
            "--epochs",
            str(epochs),
            "--data-dir",
            data_dir,
            "--checkpoint-dir",
            folder,
        ]
        started = time.perf_counter()
        steps, epoch_ends = [], []  # (step number, seconds) of epoch 1's loss lines; seconds of each epoch's end
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace"
        ) as process:
            for line in process.stdout:
                now = time.perf_counter() - started
                match = STEP_LINE[script].search(line)
                if match and not epoch_ends:  # epoch 1's (the tutorial counts its steps across epochs)
                    steps.append((int(match.group(1)), now))
                elif EPOCH_DONE[script].search(line):
                    epoch_ends.append(now)
            errors = process.stderr.read()
        finished = time.perf_counter() - started
    if process.returncode != 0 or len(epoch_ends) != epochs or len(steps) < 2:
        raise RuntimeError(
            f"{script} exited with {process.returncode} after {len(epoch_ends)} of {epochs} epochs: "
            f"{errors.strip().splitlines()[-1:] or ''}"
        )
    (first_step, first_time), (last_step, last_time) = steps[0], steps[-1]
    step_seconds = (last_time - first_time) / (last_step - first_step)
    return {
        "start_up_s": first_time - first_step * step_seconds,
        "steady_epoch_s": (epoch_ends[-1] - epoch_ends[0]) / (epochs - 1),
        "finished_s": finished,
    }


def whole_programs(args):
    """Both programs, interleaved, --repeats times; the medians of their start-up, steady epoch and
    whole run extrapolated to 20 epochs: the N-epoch run's time plus (20 - N) steady epochs."""
    runs = {"train.py": [], "tutorial.py": []}
    for _ in range(args.repeats):
        for script in runs:
            timing = time_program(script, args.whole_epochs, args.data_dir)
            runs[script].append(
                {
                    "start_up_s": timing["start_up_s"],
                    "steady_epoch_s": timing["steady_epoch_s"],
                    "whole_20_epochs_s": timing["finished_s"] + (20 - args.whole_epochs) * timing["steady_epoch_s"],
                }
            )
    import_seconds, optimizer_seconds = torch_start_up(args.repeats)
    report = {
        "device": f"cpu: {cpu_name()}",
        "cpu_count": os.cpu_count(),
        "torch": str(torch.__version__),
        "epochs_run": args.whole_epochs,
        "repeats": args.repeats,
        "import_torch_s": round(import_seconds, 3),
        "first_torch_optimizer_s": round(optimizer_seconds, 3),
    }
    for script, measured in runs.items():
        name = script.removesuffix(".py")
        for key in measured[0]:
            report[f"{name}_{key}"] = round(statistics.median(run[key] for run in measured), 3)
    report["whole_run_ratio"] = round(report["tutorial_whole_20_epochs_s"] / report["train_whole_20_epochs_s"], 2)
    return report


def torch_start_up(repeats):
    """Medians of (seconds to import torch, seconds more for the first torch.optim optimizer), each
    measured in a fresh process."""
    runs = [
        subprocess.run([sys.executable, "-c", START_UP], capture_output=True, text=True, check=True).stdout.split()
        for _ in range(repeats)
    ]
    return statistics.median(float(run[0]) for run in runs), statistics.median(float(run[1]) for run in runs)


def whole_text(report):
    lines = [
        f"{report['device']}, torch {report['torch']}: each program run for {report['epochs_run']} epochs, "
        f"{report['repeats']} times interleaved; medians, extrapolated to 20 epochs",
        f"{'program':<14} {'start-up s':>10} {'steady epoch s':>15} {'20 epochs s':>12}",
    ]
    for name in ("tutorial", "train"):
        lines.append(
            f"{name + '.py':<14} {report[f'{name}_start_up_s']:>10.2f} {report[f'{name}_steady_epoch_s']:>15.3f} "
            f"{report[f'{name}_whole_20_epochs_s']:>12.1f}"
        )
    lines.append(f"python train.py takes 1/{report['whole_run_ratio']:.1f} of python tutorial.py's time")
    lines.append(
        f"start-up, apart: import torch {report['import_torch_s']:.2f} s; the first torch.optim optimizer "
        f"{report['first_torch_optimizer_s']:.2f} s more (it imports torch._dynamo; train.py's own do not)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    commands.script(main)
