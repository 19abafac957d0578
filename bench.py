"""Training speed of the tutorial's pipeline, ours, and the matmul floor: python bench.py

All three run the same number of steps on the same device, in one process:
  classic  torchvision ToTensor()+Normalize per image, DataLoader(batch_size=64, shuffle=True),
           autograd and the default Adam, as the tutorial writes it;
  ours     mnist_mlp's loop, as train.py runs it;
  floor    only the forward and backward matrix multiplications of the same shapes.
A benchmark, not a test: nothing here asserts anything.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
from torch import nn

import mnist_mlp


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
    """One step as the tutorial writes it; returns the loss, read every step (loss.item())."""
    images, labels = images.to(device), labels.to(device)
    optimizer.zero_grad()
    loss = criterion(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_classic(data_dir, device, steps, warmup):
    """The tutorial's pipeline; returns seconds for `steps` steps after `warmup` untimed ones."""
    loader, _, model, criterion, optimizer = tutorial_pipeline(data_dir, device)

    def batches():
        while True:
            yield from loader

    batch_iterator = batches()
    started = None
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        tutorial_step(model, criterion, optimizer, *next(batch_iterator), device)
    synchronize(device)
    return time.perf_counter() - started


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


def time_ours(data_dir, device, steps, warmup):
    """train.py's loop: data resident on the device, hand-written backward, fused Adam."""
    train_split, _ = mnist_mlp.load_dataset(data_dir, download=False)
    train_split = train_split.to(device)
    torch.manual_seed(1)
    model = mnist_mlp.NoteModel().to(device)
    step = mnist_mlp.TrainStep(model, mnist_mlp.make_optimizer("adam", model.parameters(), 0.001))
    generator = torch.Generator().manual_seed(1)

    def run(count):
        while count > 0:
            order = mnist_mlp.epoch_order(len(train_split), generator)[:count * 64]
            result = mnist_mlp.train_epoch(step, train_split, order, 64, log_interval=100)
            count -= len(result.step_losses)
        synchronize(device)

    run(warmup)
    started = time.perf_counter()
    run(steps)
    return time.perf_counter() - started


def time_floor(device, steps, warmup, hidden=(128, 64)):
    """Only the matmuls of a step: 3 forward, 3 weight gradients, 2 input gradients."""
    sizes = [784, *hidden, 10]
    weights = [torch.randn(n_out, n_in, device=device) for n_in, n_out in zip(sizes, sizes[1:])]
    activations = {}  # batch size -> random stand-ins for each layer's input and output
    started = None
    for step, batch in enumerate(batch_sizes(60000, 64, warmup + steps)):
        if step == warmup:
            synchronize(device)
            started = time.perf_counter()
        if batch not in activations:
            activations[batch] = [torch.randn(batch, n, device=device) for n in sizes]
        x = activations[batch]
        for index, weight in enumerate(weights):
            torch.mm(x[index], weight.t())            # forward
            torch.mm(x[index + 1].t(), x[index])      # weight gradient
            if index > 0:
                torch.mm(x[index + 1], weight)        # gradient of the layer's input
    synchronize(device)
    return time.perf_counter() - started


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
    parser = mnist_mlp.ArgumentParser(description=__doc__.splitlines()[0],
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    parser.add_argument("--steps", type=mnist_mlp.positive_int, default=938, help="timed steps (938 = one epoch)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before each timing")
    parser.add_argument("--threads", type=mnist_mlp.positive_int, default=1, help="torch CPU threads")
    parser.add_argument("--pipelines", nargs="+", choices=["classic", "ours", "floor"],
                        default=["classic", "ours", "floor"], help="which to time")
    parser.add_argument("--data-dir", default=mnist_mlp.DEFAULT_DATA_DIR, help="dataset root folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--tutorial-epochs", type=mnist_mlp.positive_int, metavar="N",
                        help="instead, run the tutorial's whole program for N epochs with torch's default "
                             "threads (time it with /usr/bin/time to compare with train.py)")
    try:
        args = parser.parse_args(argv)
        device = mnist_mlp.resolve_device(args.device)
        mnist_mlp.load_dataset(args.data_dir, download=False)  # decompress and check before timing
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
    torch.set_num_threads(args.threads)

    seconds = {}
    if "classic" in args.pipelines:
        seconds["classic"] = time_classic(args.data_dir, device, args.steps, args.warmup)
    if "ours" in args.pipelines:
        seconds["ours"] = time_ours(args.data_dir, device, args.steps, args.warmup)
    if "floor" in args.pipelines:
        seconds["floor"] = time_floor(device, args.steps, args.warmup)
    samples = sum(batch_sizes(60000, 64, args.steps))
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}: {cpu_name()}",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": str(torch.__version__),
        "steps": args.steps, "samples": samples,
    }
    for name, value in seconds.items():
        report[f"{name}_seconds"] = round(value, 4)
        report[f"{name}_samples_per_s"] = round(samples / value, 1)
        report[f"{name}_ms_per_step"] = round(1000 * value / args.steps, 4)
    if "classic" in seconds and "ours" in seconds:
        report["speedup"] = round(seconds["classic"] / seconds["ours"], 2)
    if "floor" in seconds and "ours" in seconds:
        report["floor_multiple"] = round(seconds["ours"] / seconds["floor"], 2)

    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['device']}, {report['threads']} of {report['cpu_count']} threads, torch {report['torch']}, "
          f"{args.steps} steps of batch 64")
    print(f"{'pipeline':<10} {'samples/s':>12} {'ms/step':>9}")
    for name in seconds:
        print(f"{name:<10} {report[f'{name}_samples_per_s']:>12,.0f} {report[f'{name}_ms_per_step']:>9.3f}")
    if "speedup" in report:
        print(f"ours is {report['speedup']:.1f}x the classic pipeline")
    if "floor_multiple" in report:
        print(f"ours takes {report['floor_multiple']:.2f}x the floor's time per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
