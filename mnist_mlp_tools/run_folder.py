"""The run folder: one train.py at a time (a lock), one run per folder (claiming it), metrics.csv
(written whole, never losing a row; one reader for train.py and plot.py), and a graceful stop."""

import contextlib
import csv
import glob
import io
import os
import re
import shlex
import signal
import sys

import filelock

from . import commands, safe_files
from .commands import UsageError, error_text, silence_stdout
from .safe_files import is_regular_file

checkpoints = commands.lazy_import("mnist_mlp_tools.checkpoints")  # at first use: plot.py needs no torch

CHECKPOINT_NAME = "noteLearning_{epoch}.pth"
METRICS_NAME = "metrics.csv"
METRICS_FIELDS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_loss",
    "test_accuracy",
    "seconds",
    "samples_per_s",
    "checkpoint",
    "run",
]  # run: the run's identity (not in older files)


class FolderLock(filelock.FileLock):
    """Keep a second train.py out of the folder while this one writes there: filelock's lock on .train.lock
    (flock, freed even when the process is killed; where the system has no flock, the file's exclusive
    creation, and one that a killed run left must be removed by hand)."""

    def __init__(self, folder):
        super().__init__(os.path.join(folder, ".train.lock"), timeout=0)  # one try: taken is taken
        self.folder = folder

    def __enter__(self):
        try:
            return super().__enter__()
        except filelock.Timeout:
            raise UsageError(
                f"another train.py is writing to {self.folder}; wait for it, or choose another "
                f"--checkpoint-dir (if none is running, remove {self.lock_file})"
            ) from None
        except OSError as error:
            raise UsageError(
                f"cannot lock {self.lock_file} ({error.strerror or error}); remove it, or choose "
                "another --checkpoint-dir"
            ) from None

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):  # removed while still held: no other run can take a file that goes
            os.remove(self.lock_file)
        return super().__exit__(*exc)


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
        match = re.fullmatch(r"noteLearning_(\d+)\.pth", os.path.basename(path), re.ASCII)
        if match:
            found[int(match.group(1))] = path
    return found


def claim_folder(folder, start_epoch, progress, overwrite, run_id):
    """Make sure this run mixes with no other in `folder`: refuse (saying how to go on), or (overwrite)
    clear and say what was removed.

    Each run has an identity, recorded in its checkpoints' config and in metrics.csv's `run` column.
    A new run needs a folder without checkpoints or metrics.csv; where the folder holds one earlier
    run, the message gives the command that continues it. A resumed run needs a folder whose earlier
    checkpoints and metrics rows are its own, and without later epochs (another run's, or its own
    from before, which a resume from an earlier epoch would replace). Returns the metrics rows to
    keep (this run's, up to start_epoch).
    """
    metrics_path = os.path.join(folder, METRICS_NAME)
    resume_path = os.path.abspath(progress.last_checkpoint) if progress.last_checkpoint else None
    runs = {}  # epoch -> run identity (None: unreadable) of every checkpoint here but the one resumed from
    for epoch, path in checkpoint_epochs(folder).items():
        if os.path.abspath(path) != resume_path:
            runs[epoch] = None
            with contextlib.suppress(UsageError):
                runs[epoch] = checkpoints.load_checkpoint(path)["config"].get("run")
    rows = read_metrics(metrics_path) if start_epoch > 0 and os.path.lexists(metrics_path) else []
    foreign = [row for row in rows if row.get("run") not in (None, "", run_id)]  # legacy rows have no run
    others = sorted(epoch for epoch, run in runs.items() if epoch > start_epoch or run != run_id)
    conflicts = [CHECKPOINT_NAME.format(epoch=epoch) for epoch in others]
    if (start_epoch == 0 and os.path.lexists(metrics_path)) or foreign:
        conflicts.append(METRICS_NAME)
    if conflicts and not overwrite:
        raise UsageError(_conflict_message(folder, start_epoch, runs, run_id, progress) + f" ({_names(conflicts)})")
    try:
        for epoch in others:
            os.remove(os.path.join(folder, CHECKPOINT_NAME.format(epoch=epoch)))
        if (start_epoch == 0 or foreign) and os.path.lexists(metrics_path):
            os.remove(metrics_path)
            rows = []
    except OSError as error:
        raise UsageError(f"cannot replace the earlier files in {folder} ({error.strerror})") from None
    if conflicts:
        print_progress(f"--overwrite: removed {_names(conflicts, limit=len(conflicts))} from {folder}")
    return [row for row in rows if int(row["epoch"]) <= start_epoch]


def _names(names, limit=3):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _conflict_message(folder, start_epoch, runs, run_id, progress):
    """What the folder holds, and the commands that go on from here."""
    later_own = sorted(epoch for epoch, run in runs.items() if epoch > start_epoch and run == run_id)
    if start_epoch > 0 and later_own and all(run == run_id for run in runs.values()):
        return (
            f"resuming from epoch {start_epoch} would replace epochs {later_own[0]}-{later_own[-1]} of this same run "
            f"in {folder}: pass --overwrite to replace them, or choose another --checkpoint-dir"
        )
    identities = set(runs.values())
    if start_epoch == 0 and runs and len(identities) == 1 and None not in identities:  # one earlier run, whole
        newest = max(runs)
        path = os.path.join(folder, CHECKPOINT_NAME.format(epoch=newest))
        if newest < progress.epochs:
            go_on = f"continue it with: {progress.resume_command(path)}"
        else:
            go_on = f"evaluate it with: python evaluate.py {path}"
        return (
            f"{folder} already holds a run that reached epoch {newest}; {go_on}; or pass --overwrite to start "
            "over, or choose another --checkpoint-dir"
        )
    how = "resume it with --resume, " if start_epoch == 0 else ""
    return (
        f"{folder} already holds another run; {how}choose another --checkpoint-dir, or pass --overwrite to replace it"
    )


def read_csv(path, advice=""):
    """(column names, rows as dicts) of a CSV file; one-line UsageErrors for anything unreadable.
    A byte-order mark, as Excel saves one, is read past."""
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such file")
    if not is_regular_file(path):
        raise UsageError(f"{path} is not a regular file{advice}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            reader = csv.DictReader(io.StringIO(file.read()))
            return reader.fieldnames, list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UsageError(f"cannot read {path} ({error_text(error)}){advice}") from None


def read_metrics(path):
    """The rows of a metrics.csv that train.py wrote; refuses (never rewrites) anything else."""
    advice = "; it is left as it is: move it away, or pass --overwrite to replace it"
    columns, rows = read_csv(path, advice)
    if columns is not None and columns not in (METRICS_FIELDS, METRICS_FIELDS[:-1]):
        raise UsageError(f"{path} has other columns than train.py writes ({','.join(columns)[:80]}){advice}")
    if any(commands.whole_number(row.get("epoch")) is None or None in row for row in rows):
        raise UsageError(f"{path} has rows train.py cannot read{advice}")
    return rows


def metrics_row(epoch, metrics, checkpoint_name, run_id):
    """One metrics.csv row from a checkpoint's `metrics` entry."""
    row = {"epoch": epoch, "checkpoint": checkpoint_name, "run": run_id or ""}
    for key, digits in (
        ("train_loss", 4),
        ("val_loss", 4),
        ("val_accuracy", 2),
        ("test_loss", 4),
        ("test_accuracy", 2),
        ("seconds", 2),
        ("samples_per_s", 0),
    ):
        if isinstance(metrics.get(key), (int, float)):
            row[key] = f"{metrics[key]:.{digits}f}"
    return row


def metrics_text(metrics):
    """An epoch's figures as train.py prints them."""
    val = (
        f"  val loss {metrics['val_loss']:.4f}  val accuracy {metrics['val_accuracy']:.2f}%"
        if "val_loss" in metrics
        else ""
    )
    return (
        f"train loss {metrics['train_loss']:.4f}{val}  test loss {metrics['test_loss']:.4f}  "
        f"test accuracy {metrics['test_accuracy']:.2f}%  {metrics['seconds']:.1f} s  "
        f"{metrics['samples_per_s']:.0f} samples/s"
    )


def add_metrics_row(folder, rows, epoch, metrics, run_id):
    """Put the epoch's row (from its checkpoint's metrics) into `rows` and write metrics.csv;
    WriteFailed if it cannot be written (the checkpoint already is)."""
    name = CHECKPOINT_NAME.format(epoch=epoch)
    rows[:] = [row for row in rows if int(row["epoch"]) < epoch] + [metrics_row(epoch, metrics, name, run_id)]
    try:
        write_metrics(folder, rows)
    except OSError as error:
        raise WriteFailed(
            f"cannot write {os.path.join(folder, METRICS_NAME)} ({error.strerror or error}); "
            f"{os.path.join(folder, name)} was saved"
        ) from None


def write_metrics(folder, rows):
    """Write metrics.csv atomically from `rows`, adding any row a checkpoint in `folder` has and
    `rows` lacks (a stop between a checkpoint's save and this write would otherwise lose it)."""
    by_epoch = {int(row["epoch"]): row for row in rows}
    newest = max(by_epoch)
    for epoch, path in checkpoint_epochs(folder).items():
        if epoch not in by_epoch and epoch < newest:
            with contextlib.suppress(UsageError):
                checkpoint = checkpoints.load_checkpoint(path)
                by_epoch[epoch] = metrics_row(
                    epoch, checkpoint.get("metrics", {}), os.path.basename(path), checkpoint["config"].get("run")
                )
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=METRICS_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(by_epoch[epoch] for epoch in sorted(by_epoch))
    safe_files.atomic_write(os.path.join(folder, METRICS_NAME), lambda file: file.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------- stopping and output


class GracefulStop:
    """Turn the first Ctrl-C or SIGTERM into a request to stop between steps.

    A second one stops at once, except during a save, which always completes first.
    """

    def __init__(self):
        self.signal = None
        self.saving = False
        self.finishing = False  # the stop is being reported: more signals change nothing

    def __enter__(self):
        self.previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.finishing:
            return
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


def print_progress(*args, **kwargs):
    """print() to stdout that keeps training when stdout is gone (`train.py | head -1`, a full disk,
    /dev/full): the checkpoints are what matters. The first failure is reported on stderr, if it can be."""
    try:
        print(*(commands.printable(str(arg)) for arg in args), **kwargs, flush=True)
    except OSError as error:
        silence_stdout()
        if not isinstance(error, BrokenPipeError):  # a reader that left wanted no more: nothing to report
            with contextlib.suppress(OSError, ValueError):
                print(
                    f"warning: cannot write to stdout ({error.strerror or error}); training goes on, "
                    "the checkpoints are still written",
                    file=sys.stderr,
                    flush=True,
                )


class Progress:
    """What a stop must report: the newest complete checkpoint and how to go on from it."""

    def __init__(self, script, argv, last_checkpoint, epochs):
        self.script = script
        self.argv = argv
        self.last_checkpoint = last_checkpoint
        self.epochs = epochs  # the last epoch this run was asked for
        self.epoch = None
        self.reported = False

    def resume_command(self, checkpoint=None):
        """The command that resumes from `checkpoint` (the newest complete one by default): this run's
        flags, less any earlier --resume or --overwrite."""
        checkpoint = checkpoint or self.last_checkpoint
        rest, args_iter = [], iter(self.argv)
        for arg in args_iter:  # the original flags, minus any earlier --resume or --overwrite
            if arg == "--resume":
                next(args_iter, None)
            elif not arg.startswith("--resume=") and arg != "--overwrite":
                rest.append(arg)
        script = os.path.relpath(os.path.abspath(self.script))
        if script.startswith(".."):
            script = os.path.abspath(self.script)
        return shlex.join(["python", script, *rest, "--resume", checkpoint])

    def report_stop(self, what, where=True):
        """On stderr, once: why the run stopped (with where=False, `what` alone, as an error line), then
        the newest checkpoint and the command that resumes from it."""
        if self.reported:  # a second Ctrl-C a few milliseconds after the first
            return
        self.reported = True
        if where:
            during = f" during epoch {self.epoch}; nothing of that epoch was saved" if self.epoch else ""
            print(f"\n{what}{during}.", file=sys.stderr)
        else:
            print(what, file=sys.stderr)
        if self.last_checkpoint is None:
            if not where:
                return
            print("no checkpoint was written yet; run the same command again to start over.", file=sys.stderr)
        else:
            print(
                f"last complete checkpoint: {self.last_checkpoint}\nresume with: {self.resume_command()}",
                file=sys.stderr,
            )


class WriteFailed(Exception):
    pass
