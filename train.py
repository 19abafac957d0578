"""Train the tutorial's MNIST MLP: python train.py --epochs 20 --device cuda

Writes noteLearning_{epoch}.pth after every epoch and each epoch's figures to metrics.csv.
"""

import signal
import sys

if __name__ == "__main__":  # a Ctrl-C while torch is still loading: leave quietly, as later
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))

import argparse
import contextlib
import csv
import fcntl
import glob
import io
import os
import re
import shlex
import time

import torch
from torch import nn

import mnist_mlp
from mnist_mlp import UsageError

METRICS_NAME = "metrics.csv"
METRICS_FIELDS = ["epoch", "train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy",
                  "seconds", "samples_per_s", "checkpoint"]
OPTIMIZERS = {
    "adam": "Adam, as the tutorial (torch.optim.Adam)",
    "sgd": "SGD with --momentum (torch.optim.SGD)",
    "adam-no-bias-correction": "Adam without its bias correction: lr*m/(sqrt(v)+eps) with m, v not divided by "
                               "(1-beta^t) (mnist_mlp.adam_update), to see what the correction does",
}


def parse_args(argv):
    parser = mnist_mlp.ArgumentParser(
        description="Train the tutorial's 784-128-64-10 MLP on MNIST.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=mnist_mlp.bounded_int(1, 1_000_000), default=20, help="total number of epochs")
    parser.add_argument("--batch-size", type=mnist_mlp.bounded_int(1, 1_000_000), default=64, help="training batch size")
    parser.add_argument("--lr", type=mnist_mlp.positive_float, default=0.001, help="learning rate")
    parser.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
                        help="; ".join(f"{name}: {text}" for name, text in OPTIMIZERS.items()))
    parser.add_argument("--momentum", type=mnist_mlp.fraction, default=0.9, help="SGD momentum, 0 to below 1 (0: plain SGD)")
    parser.add_argument("--hidden", type=mnist_mlp.bounded_int(1, mnist_mlp.MAX_HIDDEN), nargs="+", default=[128, 64],
                        help="hidden layer sizes")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=mnist_mlp.bounded_int(1, os.cpu_count() or 1), default=None,
                        help="CPU threads for torch (default: 1, fastest for these small matrices)")
    parser.add_argument("--dataset", choices=sorted(mnist_mlp.DATASETS), default="mnist", help="dataset")
    parser.add_argument("--data-dir", default=mnist_mlp.DEFAULT_DATA_DIR, help="dataset root folder")
    parser.add_argument("--checkpoint-dir", default=".", help="where checkpoints and metrics.csv go")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints and metrics.csv of an earlier run in --checkpoint-dir "
                             "(without it, a folder that holds another run is refused)")
    parser.add_argument("--seed", type=mnist_mlp.bounded_int(0, 2**63 - 1), default=1,
                        help="seed for weights and batch order")
    parser.add_argument("--log-interval", type=mnist_mlp.bounded_int(1, 1_000_000), default=100,
                        help="print the mean training loss every this many steps")
    parser.add_argument("--test-batch-size", type=mnist_mlp.bounded_int(1, 1_000_000), default=1000,
                        help="evaluation batch size")
    parser.add_argument("--val-size", type=mnist_mlp.bounded_int(0, 1_000_000), default=0,
                        help="hold out this many training images for validation")
    parser.add_argument("--no-fused", action="store_true",
                        help="use torch's for-loop optimizer instead of the fused kernel "
                             "(bit-identical to the tutorial's Adam, slower)")
    parser.add_argument("--step", choices=["auto", "autograd", "fast"], default="auto",
                        help="training step: autograd is the textbook step (zero_grad, forward, loss, backward, "
                             "step); fast is the same step with the backward pass written out, only for a model "
                             "it is proven equal to; auto takes fast where proven, autograd elsewhere")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, launch the fast step's kernels one by one instead of capturing them once "
                             "as a CUDA graph and replaying it each step (the default: 2.6x faster per step)")
    parser.add_argument("--resume", metavar="CHECKPOINT", help="continue training from this checkpoint")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow --resume from a pickled whole model (runs code from the file)")
    args = parser.parse_args(argv)
    if args.resume is not None and not args.resume.strip():
        parser.error("--resume needs a checkpoint path (it was given an empty one)")
    return args


def run_config(args, optimizer, device):
    """What a checkpoint records about the run; a resume must match it to continue exactly."""
    config = {"hidden": list(args.hidden), **mnist_mlp.optimizer_config(optimizer),
              "batch_size": args.batch_size, "seed": args.seed, "dataset": args.dataset,
              "val_size": args.val_size, "fused": not args.no_fused}
    if device.type == "cpu":
        config["threads"] = torch.get_num_threads()  # the matmuls round differently on other thread counts
    return config


FLAGS = {"hidden": "--hidden", "optimizer": "--optimizer", "lr": "--lr", "momentum": "--momentum",
         "batch_size": "--batch-size", "seed": "--seed", "dataset": "--dataset", "val_size": "--val-size",
         "fused": "--no-fused", "threads": "--threads"}


def check_resume_config(path, saved, current):
    """Refuse to resume a run with other settings than the checkpoint's."""
    if list(saved["hidden"]) != current["hidden"]:
        raise UsageError(f"{path} has hidden sizes {list(saved['hidden'])}, but --hidden is "
                         f"{' '.join(map(str, current['hidden']))}; pass --hidden "
                         f"{' '.join(map(str, saved['hidden']))}")
    if "optimizer" not in saved:
        return  # a bare state_dict or a tutorial file: weights only
    differences = [f"{FLAGS.get(key, key)}: checkpoint {saved[key]!r}, now {value!r}"
                   for key, value in current.items() if key in saved and saved[key] != value]
    if differences:
        raise UsageError(f"{path} was trained with other settings ({'; '.join(differences)}); "
                         "pass the same flags to resume it exactly")


# ----------------------------------------------------------------------------- the checkpoint folder

class FolderLock:
    """Keep a second train.py out of the folder while this one writes there (an flock, freed at exit)."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".train.lock")
        self.file = None

    def __enter__(self):
        try:
            self.file = open(self.path, "a+")
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UsageError(f"another train.py (process {holder}) is writing to "
                             f"{os.path.dirname(self.path) or '.'}; wait for it or choose another --checkpoint-dir")
        except OSError as error:
            raise UsageError(f"cannot lock {self.path} ({error.strerror})") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.remove(self.path)
        self.file.close()


def writable_folder(path):
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise UsageError(f"cannot create checkpoint folder {path}: {error.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"checkpoint folder {path} is not writable")


def checkpoint_epochs(folder):
    """{epoch: path} of the noteLearning_{epoch}.pth files in `folder`."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "noteLearning_*.pth")):
        match = re.fullmatch(r"noteLearning_(\d+)\.pth", os.path.basename(path))
        if match:
            found[int(match.group(1))] = path
    return found


def claim_folder(args, start_epoch):
    """Make sure this run mixes with no other in --checkpoint-dir: refuse, or (--overwrite) clear.

    A new run needs a folder without checkpoints or metrics.csv; a resumed one, a folder without
    checkpoints after its epoch. Returns the metrics rows to keep (those up to start_epoch).
    """
    folder = args.checkpoint_dir
    metrics_path = os.path.join(folder, METRICS_NAME)
    resume_path = os.path.abspath(args.resume) if args.resume else None
    later = {epoch: path for epoch, path in checkpoint_epochs(folder).items()
             if epoch > start_epoch and os.path.abspath(path) != resume_path}
    conflicts = [os.path.basename(later[epoch]) for epoch in sorted(later)]
    if start_epoch == 0 and os.path.lexists(metrics_path):
        conflicts.append(METRICS_NAME)
    if conflicts and not args.overwrite:
        shown = ", ".join(conflicts[:3]) + (f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        how = ("resume it with --resume, " if start_epoch == 0 else "") + "choose another --checkpoint-dir"
        raise UsageError(f"{folder} already holds another run ({shown}); {how}, or pass --overwrite to replace it")
    resumed_here = start_epoch > 0 and os.path.lexists(metrics_path) and not args.overwrite
    rows = read_metrics(metrics_path) if resumed_here else []
    try:
        for path in later.values():
            os.remove(path)
        if start_epoch == 0 and os.path.lexists(metrics_path):
            os.remove(metrics_path)
    except OSError as error:
        raise UsageError(f"cannot replace the earlier run in {folder} ({error.strerror})") from None
    return [row for row in rows if int(row["epoch"]) <= start_epoch]


def read_metrics(path):
    """The rows of a metrics.csv that train.py wrote; refuses (never rewrites) anything else."""
    if not mnist_mlp.is_regular_file(path):
        raise UsageError(f"{path} is not a regular file; move it away or choose another --checkpoint-dir")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:  # -sig: a BOM, as Excel saves one
            text = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {path} ({mnist_mlp._reason(error)}); move it away or pass --overwrite") from None
    try:
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is not None and reader.fieldnames != METRICS_FIELDS:
            raise UsageError(f"{path} has other columns than train.py writes ({','.join(reader.fieldnames)[:80]}); "
                             "it is left as it is: move it away, or pass --overwrite to replace it")
        rows = list(reader)
    except csv.Error as error:
        raise UsageError(f"cannot read {path} ({error}); move it away or pass --overwrite") from None
    if any(not (row.get("epoch") or "").isdigit() or None in row for row in rows):
        raise UsageError(f"{path} has rows train.py cannot read; it is left as it is: move it away, "
                         "or pass --overwrite to replace it")
    return rows


def metrics_row(epoch, metrics, checkpoint_name):
    """One metrics.csv row from a checkpoint's `metrics` entry."""
    row = {"epoch": epoch, "checkpoint": checkpoint_name}
    for key, digits in (("train_loss", 4), ("val_loss", 4), ("val_accuracy", 2), ("test_loss", 4),
                        ("test_accuracy", 2), ("seconds", 2), ("samples_per_s", 0)):
        if isinstance(metrics.get(key), (int, float)):
            row[key] = f"{metrics[key]:.{digits}f}"
    return row


def write_metrics(folder, rows):
    """Write metrics.csv atomically from `rows`, adding any row a checkpoint in `folder` has and
    `rows` lacks (a stop between a checkpoint's save and this write would otherwise lose it)."""
    by_epoch = {int(row["epoch"]): row for row in rows}
    newest = max(by_epoch)
    for epoch, path in checkpoint_epochs(folder).items():
        if epoch not in by_epoch and epoch < newest:
            with contextlib.suppress(UsageError):
                checkpoint = mnist_mlp.load_checkpoint(path)
                by_epoch[epoch] = metrics_row(epoch, checkpoint.get("metrics", {}), os.path.basename(path))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(by_epoch[epoch] for epoch in sorted(by_epoch))
    mnist_mlp.atomic_write(os.path.join(folder, METRICS_NAME), lambda file: file.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------- stopping and output

class GracefulStop:
    """Turn the first Ctrl-C or SIGTERM into a request to stop between steps.

    A second one stops at once, except during a save, which always completes first.
    """

    def __init__(self):
        self.signal = None
        self.saving = False

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and not self.saving:
            raise KeyboardInterrupt
        self.signal = self.signal or signum

    def __exit__(self, *exc):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def __call__(self):
        return self.signal is not None

    @contextlib.contextmanager
    def save(self):
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


def say(*args, **kwargs):
    """print() to stdout that keeps training when stdout is gone (`train.py | head -1`)."""
    try:
        print(*args, **kwargs, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class Progress:
    """What a stop must report: the newest complete checkpoint and how to go on from it."""

    def __init__(self, argv, last_checkpoint):
        self.argv = argv
        self.last_checkpoint = last_checkpoint
        self.epoch = None

    def resume_command(self):
        rest, args_iter = [], iter(self.argv)
        for arg in args_iter:  # the original flags, minus any earlier --resume or --overwrite
            if arg == "--resume":
                next(args_iter, None)
            elif not arg.startswith("--resume=") and arg != "--overwrite":
                rest.append(arg)
        script = os.path.relpath(os.path.abspath(__file__))
        if script.startswith(".."):
            script = os.path.abspath(__file__)
        return shlex.join(["python", script, *rest, "--resume", self.last_checkpoint])

    def report_stop(self, what):
        where = f" during epoch {self.epoch}; nothing of that epoch was saved" if self.epoch else ""
        print(f"\n{what}{where}.", file=sys.stderr)
        if self.last_checkpoint is None:
            print("no checkpoint was written yet; run the same command again to start over.", file=sys.stderr)
        else:
            print(f"last complete checkpoint: {self.last_checkpoint}\nresume with: {self.resume_command()}",
                  file=sys.stderr)


class WriteFailed(Exception):
    pass


# ----------------------------------------------------------------------------- training

def train(args, progress):
    device = mnist_mlp.resolve_device(args.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    try:  # seeding and resuming set torch's global generators: give them back as they were
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return train_on(device, args, progress)
    finally:
        torch.set_num_threads(threads_before)


def train_on(device, args, progress):
    writable_folder(args.checkpoint_dir)
    torch.manual_seed(args.seed)
    model = mnist_mlp.NoteModel(args.hidden)
    order_generator = torch.Generator().manual_seed(args.seed)
    start_epoch = 0
    resumed = None
    if args.resume:
        resumed = mnist_mlp.load_checkpoint(args.resume, trust_pickle=args.trust_pickle)
        check_resume_config(args.resume, resumed["config"], {"hidden": list(args.hidden)})
        model = mnist_mlp.model_from_checkpoint(args.resume, resumed)
    model.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = mnist_mlp.make_optimizer(args.optimizer, model.parameters(), args.lr, args.momentum,
                                         fused=not args.no_fused)
    config = run_config(args, optimizer, device)
    if resumed is not None:
        start_epoch = restore(args.resume, resumed, config, optimizer, order_generator)
        if start_epoch >= args.epochs:
            raise UsageError(f"{args.resume} is already at epoch {start_epoch}; "
                             f"pass --epochs larger than {start_epoch} to train more")

    with FolderLock(args.checkpoint_dir):
        train_split, test_split = mnist_mlp.load_dataset(args.data_dir, args.dataset)
        train_split, val_split = mnist_mlp.split_validation(train_split, args.val_size, args.seed)
        metrics_rows = claim_folder(args, start_epoch)  # after every check of the input: it may delete
        train_split, test_split = train_split.to(device), test_split.to(device)
        val_split = val_split.to(device) if val_split is not None else None

        model.train()
        step, step_description = mnist_mlp.make_train_step(model, criterion, optimizer, args.step, args.batch_size,
                                                           cuda_graph=not args.no_cuda_graph)
        say(f"training with the {step_description}")
        threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
        say(f"on {device}{threads}, {len(train_split)} {args.dataset} images, epochs {start_epoch + 1}..{args.epochs}")
        with GracefulStop() as stop, mnist_mlp.denormals_flushed():
            for epoch in range(start_epoch + 1, args.epochs + 1):
                progress.epoch = epoch
                if not train_one_epoch(epoch, args, model, optimizer, step, config, order_generator,
                                       train_split, val_split, test_split, metrics_rows, stop, progress):
                    if stop.signal == signal.SIGTERM:  # docker stop, batch schedulers
                        progress.report_stop("stopped by SIGTERM")
                        return 143
                    progress.report_stop("interrupted")
                    return 130
            progress.epoch = None
    return 0


def restore(path, resumed, config, optimizer, order_generator):
    """Load a checkpoint's optimizer and generator states; returns the epoch to go on from."""
    check_resume_config(path, resumed["config"], config)
    if "optimizer" not in resumed:
        return 0  # weights only: a fresh optimizer, epoch numbers from 1
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except Exception as error:  # a malformed entry: torch raises several kinds
        raise UsageError(f"{path}: its optimizer state does not fit ({mnist_mlp._reason(error)})") from None
    if not mnist_mlp.all_finite(resumed["optimizer"]):
        raise UsageError(f"{path}: its optimizer state holds NaN or infinity; resume from an earlier checkpoint")
    rng = resumed.get("rng")
    if rng is None:
        print(f"warning: {path} records no random-generator state: the batch order from here on will "
              "differ from an uninterrupted run's", file=sys.stderr)
    else:
        try:
            order_generator.set_state(rng["data_order"])
            torch.set_rng_state(rng["torch"])
        except Exception as error:
            raise UsageError(f"{path}: its rng entry is malformed ({mnist_mlp._reason(error)})") from None
    return resumed["epoch"]


def train_one_epoch(epoch, args, model, optimizer, step, config, order_generator,
                    train_split, val_split, test_split, metrics_rows, stop, progress):
    """Train, evaluate and save one epoch; False if a stop was asked for before it ended."""
    def log(step_number, steps, loss):
        say(f"epoch {epoch}/{args.epochs}  step {step_number}/{steps}  loss {loss:.4f}")

    started = time.perf_counter()
    order = mnist_mlp.epoch_order(len(train_split), order_generator)
    try:
        result = mnist_mlp.train_epoch(step, train_split, order, args.batch_size, args.log_interval, log, stop)
    except mnist_mlp.NonFiniteLoss as error:
        raise UsageError(f"{error} of epoch {epoch} (--lr {args.lr} with {args.optimizer}); "
                         "nothing of it was saved; try a smaller --lr") from None
    if result is None:
        return False
    train_loss = result.mean_loss  # waits for the device: the epoch's time is now real
    seconds = time.perf_counter() - started

    test = mnist_mlp.evaluate(model, test_split, args.test_batch_size)
    metrics = {"train_loss": train_loss, "test_loss": test.loss, "test_accuracy": test.accuracy,
               "test_correct": test.correct, "test_total": test.total,
               "seconds": seconds, "samples_per_s": len(train_split) / seconds}
    val_text = ""
    if val_split is not None:
        val = mnist_mlp.evaluate(model, val_split, args.test_batch_size)
        metrics.update(val_loss=val.loss, val_accuracy=val.accuracy)
        val_text = f"  val loss {val.loss:.4f}  val accuracy {val.accuracy:.2f}%"
    path = os.path.join(args.checkpoint_dir, mnist_mlp.CHECKPOINT_NAME.format(epoch=epoch))
    with stop.save():
        try:
            mnist_mlp.save_checkpoint(path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                "config": config, "metrics": metrics,
                "rng": {"data_order": order_generator.get_state(), "torch": torch.get_rng_state()},
                "torch_version": str(torch.__version__),
            })
        except mnist_mlp.NonFiniteCheckpoint:  # the weights, Adam's state or a loss: the last update diverged
            raise UsageError(f"the weights became non-finite in epoch {epoch} (--lr {args.lr} with "
                             f"{args.optimizer}); nothing of it was saved; try a smaller --lr") from None
        except OSError as error:
            raise WriteFailed(f"cannot write {path} ({error.strerror or error})") from None
        progress.last_checkpoint = path
        metrics_rows[:] = [row for row in metrics_rows if int(row["epoch"]) < epoch]
        metrics_rows.append(metrics_row(epoch, metrics, os.path.basename(path)))
        try:
            write_metrics(args.checkpoint_dir, metrics_rows)
        except OSError as error:
            raise WriteFailed(f"cannot write {os.path.join(args.checkpoint_dir, METRICS_NAME)} "
                              f"({error.strerror or error}); {path} was saved") from None
    say(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}{val_text}  test loss {test.loss:.4f}  "
        f"test accuracy {test.accuracy:.2f}%  {seconds:.1f} s  {len(train_split) / seconds:.0f} samples/s  "
        f"saved {path}")
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    progress = None
    try:
        args = parse_args(argv)
        progress = Progress(argv, args.resume)
        return train(args, progress)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WriteFailed as error:
        print(f"error: {error}", file=sys.stderr)
        if progress is not None and progress.last_checkpoint:
            progress.epoch = None
            print(f"last complete checkpoint: {progress.last_checkpoint}\n"
                  f"resume with: {progress.resume_command()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during it
        if progress is None:
            print("\ninterrupted", file=sys.stderr)
        else:
            progress.report_stop("interrupted")
        return 130


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # torch has loaded: Ctrl-C raises KeyboardInterrupt again
    sys.exit(main())
