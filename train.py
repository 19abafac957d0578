"""Train the tutorial's MNIST MLP: python train.py --epochs 20 --device cuda

Writes noteLearning_{epoch}.pth after every epoch and appends each epoch's figures to metrics.csv.
"""

import argparse
import csv
import io
import os
import shlex
import signal
import sys
import time

import torch
from torch import nn

import mnist_mlp
from mnist_mlp import UsageError

METRICS_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                  "seconds", "samples_per_s", "checkpoint"]


def parse_args(argv):
    parser = mnist_mlp.ArgumentParser(
        description="Train the tutorial's 784-128-64-10 MLP on MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=mnist_mlp.positive_int, default=20, help="total number of epochs")
    parser.add_argument("--batch-size", type=mnist_mlp.positive_int, default=64, help="training batch size")
    parser.add_argument("--lr", type=mnist_mlp.positive_float, default=0.001, help="learning rate")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="optimizer")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0 for plain SGD)")
    parser.add_argument("--hidden", type=mnist_mlp.positive_int, nargs="+", default=[128, 64], help="hidden layer sizes")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=mnist_mlp.positive_int, default=None,
                        help="CPU threads for torch (default: 1, fastest for these small matrices)")
    parser.add_argument("--dataset", choices=sorted(mnist_mlp.DATASETS), default="mnist", help="dataset")
    parser.add_argument("--data-dir", default=mnist_mlp.DEFAULT_DATA_DIR, help="dataset root folder")
    parser.add_argument("--checkpoint-dir", default=".", help="where checkpoints and metrics.csv go")
    parser.add_argument("--seed", type=int, default=1, help="seed for weights and batch order")
    parser.add_argument("--log-interval", type=mnist_mlp.positive_int, default=100,
                        help="print the mean training loss every this many steps")
    parser.add_argument("--test-batch-size", type=mnist_mlp.positive_int, default=1000, help="evaluation batch size")
    parser.add_argument("--val-size", type=mnist_mlp.non_negative_int, default=0,
                        help="hold out this many training images for validation")
    parser.add_argument("--no-fused", action="store_true",
                        help="use torch's for-loop optimizer instead of the fused kernel "
                             "(bit-identical to the tutorial's Adam, slower)")
    parser.add_argument("--step", choices=["auto", "autograd", "fast"], default="auto",
                        help="training step: autograd is the textbook step (zero_grad, forward, loss, backward, "
                             "step); fast is the same step with the backward pass written out, only for a model "
                             "it is proven equal to; auto takes fast where proven, autograd elsewhere")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue training from this checkpoint")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow --resume from a pickled whole model (runs code from the file)")
    return parser.parse_args(argv)


def run_config(args, optimizer):
    """What a checkpoint records about the run; a resume must match it."""
    return {"hidden": list(args.hidden), **mnist_mlp.optimizer_config(optimizer),
            "batch_size": args.batch_size, "seed": args.seed, "dataset": args.dataset,
            "val_size": args.val_size}


def check_resume_config(path, saved, current):
    """Refuse to resume a run with other settings than the checkpoint's."""
    if saved.get("hidden") is not None and list(saved["hidden"]) != current["hidden"]:
        raise UsageError(f"{path} has hidden sizes {list(saved['hidden'])}, but --hidden is "
                         f"{' '.join(map(str, current['hidden']))}; pass --hidden "
                         f"{' '.join(map(str, saved['hidden']))}")
    if "optimizer" not in saved:
        return  # a bare state_dict or a tutorial file: weights only
    differences = [f"{key}: checkpoint {saved.get(key)!r}, now {value!r}"
                   for key, value in current.items() if key in saved and saved[key] != value]
    if differences:
        raise UsageError(f"{path} was trained with other settings ({'; '.join(differences)}); "
                         "pass the same flags to resume")


def writable_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create checkpoint folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"checkpoint folder {path} is not writable")


def write_metrics(path, row):
    """Rewrite metrics.csv atomically: earlier epochs' rows kept, this epoch's row last."""
    rows = []
    if os.path.exists(path):
        with open(path, newline="") as file:
            rows = [old for old in csv.DictReader(file)
                    if old.get("epoch", "").isdigit() and int(old["epoch"]) < row["epoch"]]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows + [row])
    mnist_mlp.atomic_write(path, lambda file: file.write(text.getvalue().encode()))


class StopOnSigint:
    """Turn the first Ctrl-C into a request to stop between steps; a second one stops at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)

    def __call__(self):
        return self.requested


def train(args, argv):
    device = mnist_mlp.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    writable_folder(args.checkpoint_dir)

    torch.manual_seed(args.seed)
    model = mnist_mlp.NoteModel(args.hidden)
    order_generator = torch.Generator().manual_seed(args.seed)
    start_epoch = 0
    resumed = None
    if args.resume:
        resumed = mnist_mlp.load_checkpoint(args.resume, trust_pickle=args.trust_pickle)
        model = mnist_mlp.model_from_checkpoint(args.resume, resumed)
    model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = mnist_mlp.make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum,
                                         fused=not args.no_fused)
    config = run_config(args, optimizer)
    if resumed is not None:
        check_resume_config(args.resume, resumed["config"], config)
        if "optimizer" in resumed:
            optimizer.load_state_dict(resumed["optimizer"])
            start_epoch = int(resumed["epoch"])
        if "rng" in resumed:
            order_generator.set_state(resumed["rng"]["data_order"])
            torch.set_rng_state(resumed["rng"]["torch"])
        if start_epoch >= args.epochs:
            raise UsageError(f"{args.resume} is already at epoch {start_epoch}; "
                             f"pass --epochs larger than {start_epoch} to train more")

    train_split, test_split = mnist_mlp.load_dataset(args.data_dir, args.dataset)
    train_split, val_split = mnist_mlp.split_validation(train_split, args.val_size, args.seed)
    train_split, test_split = train_split.to(device), test_split.to(device)
    val_split = val_split.to(device) if val_split is not None else None

    model.train()
    step, step_description = mnist_mlp.make_train_step(model, criterion, optimizer, args.step, args.batch_size)
    metrics_path = os.path.join(args.checkpoint_dir, "metrics.csv")
    last_checkpoint = args.resume
    print(f"training with the {step_description}")
    print(f"on {device} ({torch.get_num_threads()} threads), {len(train_split)} {args.dataset} "
          f"images, epochs {start_epoch + 1}..{args.epochs}")
    with StopOnSigint() as stop, mnist_mlp.denormals_flushed():
        for epoch in range(start_epoch + 1, args.epochs + 1):
            def log(step_number, steps, loss):
                print(f"epoch {epoch}/{args.epochs}  step {step_number}/{steps}  loss {loss:.4f}", flush=True)

            started = time.perf_counter()
            order = mnist_mlp.epoch_order(len(train_split), order_generator)
            try:
                result = mnist_mlp.train_epoch(step, train_split, order, args.batch_size,
                                               args.log_interval, log, stop)
            except mnist_mlp.NonFiniteLoss as error:
                raise UsageError(f"{error} of epoch {epoch} (--lr {args.lr} with {args.optimizer}); "
                                 "try a smaller --lr") from None
            if result is None:
                return interrupted(epoch, last_checkpoint, argv)
            train_loss = result.mean_loss  # waits for the device: the epoch's time is now real
            seconds = time.perf_counter() - started

            test = mnist_mlp.evaluate(model, test_split, args.test_batch_size)
            row = {"epoch": epoch, "train_loss": f"{train_loss:.4f}", "test_loss": f"{test.loss:.4f}",
                   "test_accuracy": f"{test.accuracy:.2f}", "seconds": f"{seconds:.2f}",
                   "samples_per_s": f"{len(train_split) / seconds:.0f}"}
            val_text, val_metrics = "", {}
            if val_split is not None:
                val = mnist_mlp.evaluate(model, val_split, args.test_batch_size)
                row.update(val_loss=f"{val.loss:.4f}", val_accuracy=f"{val.accuracy:.2f}")
                val_text = f"  val loss {val.loss:.4f}  val accuracy {val.accuracy:.2f}%"
                val_metrics = {"val_loss": val.loss, "val_accuracy": val.accuracy}
            path = os.path.join(args.checkpoint_dir, mnist_mlp.CHECKPOINT_NAME.format(epoch=epoch))
            mnist_mlp.save_checkpoint(path, {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "config": config,
                "metrics": {"train_loss": train_loss, "test_loss": test.loss, "test_accuracy": test.accuracy,
                            "test_correct": test.correct, "test_total": test.total, **val_metrics},
                "rng": {"data_order": order_generator.get_state(), "torch": torch.get_rng_state()},
                "torch_version": str(torch.__version__),
            })
            last_checkpoint = path
            write_metrics(metrics_path, {**row, "checkpoint": os.path.basename(path)})
            print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}{val_text}  test loss {test.loss:.4f}  "
                  f"test accuracy {test.accuracy:.2f}%  {seconds:.1f} s  {row['samples_per_s']} samples/s  "
                  f"saved {path}", flush=True)
    return 0


def interrupted(epoch, last_checkpoint, argv):
    """Say what survived a Ctrl-C and how to go on; exit code 130 as for any SIGINT."""
    print(f"\ninterrupted during epoch {epoch}; nothing of that epoch was saved.", file=sys.stderr)
    if last_checkpoint is None:
        print("no checkpoint was written yet; run the same command again to start over.", file=sys.stderr)
        return 130
    rest, args_iter = [], iter(argv)
    for arg in args_iter:  # the original flags, minus any earlier --resume
        if arg == "--resume":
            next(args_iter, None)
        elif not arg.startswith("--resume="):
            rest.append(arg)
    command = shlex.join(["python", "train.py", *rest, "--resume", last_checkpoint])
    print(f"last complete checkpoint: {last_checkpoint}\nresume with: {command}", file=sys.stderr)
    return 130


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return train(parse_args(argv), argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
