"""Train the tutorial's MNIST MLP: python train.py --epochs 20 --device cuda

Writes noteLearning_{epoch}.pth and a metrics.csv row after every epoch. The pieces are mnist_mlp's lesson;
fast_step makes a step fast where it is proven equal; checkpoints and run_folder keep the files safe."""

import dataclasses
import os
import signal
import time
import uuid

from mnist_mlp_tools import commands, optimizers, run_folder, safe_files
from mnist_mlp_tools.commands import UsageError

torch, mnist_mlp, checkpoints, data_files, fast_step, models = commands.lazy_import(
    "torch",
    "mnist_mlp",
    "mnist_mlp_tools.checkpoints",
    "mnist_mlp_tools.data_files",
    "mnist_mlp_tools.fast_step",
    "mnist_mlp_tools.models",
)


def parse_args(argv):
    parser = commands.ArgumentParser(description="Train the tutorial's MLP (or your edit of NoteModel) on MNIST.")
    whole = commands.bounded_int(1, 1_000_000)
    group = parser.add_argument_group("training (the tutorial's settings by default)")
    group.add_argument("--epochs", type=whole, default=20, help="total number of epochs")
    group.add_argument("--batch-size", type=whole, default=64, help="training batch size")
    group.add_argument("--lr", type=commands.positive_float, default=0.001, help="learning rate")
    group.add_argument(
        "--optimizer",
        choices=list(optimizers.OPTIMIZERS),
        default="adam",
        help="; ".join(f"{name}: {kind.help}" for name, kind in optimizers.OPTIMIZERS.items()),
    )
    group.add_argument(
        "--momentum", type=commands.fraction, default=0.9, help="SGD momentum, 0 to below 1 (0: plain SGD)"
    )
    group.add_argument("--weight-decay", type=commands.fraction, help="weight decay (default: the optimizer's own)")
    group.add_argument(
        "--inputs",
        choices=("tutorial", "zero-one"),
        default="tutorial",  # mnist_mlp.INPUT_SCALINGS
        help="pixels p as inputs: tutorial: p/127.5 - 1 (ToTensor, Normalize); zero-one: p/255 (ToTensor)",
    )
    group.add_argument(
        "--hidden",
        type=commands.bounded_int(1, commands.MAX_WIDTH),
        nargs="+",
        metavar="WIDTH",
        help="the widths NoteModel(...) takes (the tutorial's: 128 64; default: NoteModel's own, "
        "or the resumed checkpoint's)",
    )
    group.add_argument(
        "--seed", type=commands.bounded_int(0, 2**63 - 1), default=1, help="seed for weights and batch order"
    )
    group = parser.add_argument_group("data")
    commands.add_dataset_flag(group)
    commands.add_data_dir_flag(group)
    group.add_argument(
        "--val-size", type=commands.bounded_int(0, 1_000_000), default=0, help="training images held out"
    )
    group.add_argument("--test-batch-size", type=whole, default=1000, help="evaluation batch size")
    group = parser.add_argument_group("output and resuming")
    group.add_argument("--checkpoint-dir", default=".", help="where checkpoints and metrics.csv go")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files in --checkpoint-dir that this run "
        "would mix with (another run's, or this run's later epochs); says what it removed",
    )
    group.add_argument(
        "--log-interval", type=whole, default=100, help="print the mean training loss every this many steps"
    )
    group.add_argument("--resume", metavar="CHECKPOINT", help="continue training from this checkpoint")
    commands.add_trust_pickle_flag(group, "allow --resume from a pickled whole model")
    group = parser.add_argument_group("speed (the same numbers, except with --fused or other --threads)")
    commands.add_device_flag(group)
    group.add_argument(
        "--threads",
        type=commands.bounded_int(1, os.cpu_count() or 1),
        default=1,
        help="CPU threads for torch: 1 is fastest for these small matrices",
    )
    group.add_argument(
        "--step",
        choices=["auto", "autograd", "fast"],
        default="auto",
        help="autograd: the textbook step; fast: the backward written out, for a model it is proven "
        "equal to; auto: fast where proven, autograd elsewhere",
    )
    group.add_argument(
        "--fused", action="store_true", help="torch's fused optimizer: faster, its last bits differ from the tutorial's"
    )
    args = parser.parse_args(argv)
    if args.weight_decay and args.optimizer == "adam-no-bias-correction":
        raise UsageError("--weight-decay: adam-no-bias-correction takes none (adam or adamw do)")
    if args.resume is not None:
        commands.existing_file(args.resume, "checkpoint", "--resume")
    return args


class Run:
    """One training run: its model, optimizer, step, data, folder and progress, built from the flags."""

    def __init__(self, args, device, progress):
        self.args, self.device, self.progress = args, device, progress
        run_folder.writable_folder(args.checkpoint_dir)
        resumed = None if not args.resume else checkpoints.load_checkpoint(args.resume, trust_pickle=args.trust_pickle)
        model_args = models.fit_in_memory(
            models.constructor_args(args.hidden)
            if resumed is None
            else checkpoints.resume_widths(args.resume, resumed["config"], args.hidden)
        )
        torch.manual_seed(args.seed)  # as the tutorial with a seed: weights first, then the batch order
        self.model = models.build(model_args)  # the NoteModel in mnist_mlp.py, however it is written
        if resumed is not None:
            models.load_weights(args.resume, resumed, self.model)
        self.model.to(device)
        models.check_output(self.model, mnist_mlp.DATASETS[args.dataset][1])
        # the data now: the step is proven on the epoch's own batch sizes
        splits = [
            dataclasses.replace(part, scaling=args.inputs) for part in data_files.load(args.data_dir, args.dataset)
        ]
        train_split, val_split = data_files.split_validation(splits[0], args.val_size, args.seed)
        self.train_split, self.test_split = train_split.to(device), splits[1].to(device)
        self.val_split = val_split.to(device) if val_split is not None else None
        self.order_generator = torch.Generator().manual_seed(args.seed)
        images, batch = len(train_split), min(args.batch_size, len(train_split))
        settings = {key: getattr(args, key) for key in ("optimizer", "lr", "momentum", "weight_decay", "fused")}
        self.step, self.optimizer, self.step_description = fast_step.make_training(
            self.model, torch.nn.CrossEntropyLoss(), settings, args.step, {batch, images % batch} - {0}
        )
        self.config = {
            "hidden": model_args,
            **fast_step.optimizer_config(self.optimizer),
            "inputs": args.inputs,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "dataset": args.dataset,
            "val_size": args.val_size,
            "fused": args.fused,  # threads: the matmuls' rounding
            **({"threads": torch.get_num_threads()} if device.type == "cpu" else {}),
            "run": (resumed or {}).get("config", {}).get("run") or uuid.uuid4().hex,  # the run's identity
            "model_source": models.source_fingerprint(),  # a checkpoint read by other code is told apart
        }
        self.start_epoch = 0
        if resumed is not None:
            self.start_epoch = checkpoints.restore_training_state(
                args.resume, resumed, self.config, self.optimizer, self.order_generator
            )
        if self.start_epoch >= args.epochs:
            raise UsageError(
                f"{args.resume} is already at epoch {self.start_epoch}; "
                f"pass --epochs larger than {self.start_epoch} to train more"
            )

    def claim_folder(self):
        """Claim the checkpoint folder: after every check of the input, since it may delete files."""
        self.metrics_rows = run_folder.claim_folder(
            self.args.checkpoint_dir, self.start_epoch, self.progress, self.args.overwrite, self.config["run"]
        )

    def train_one_epoch(self, epoch, stop):
        """mnist_mlp.train_epoch over this epoch's shuffled batches; None if a stop was asked for."""

        def log(step_number, steps, loss):
            run_folder.print_progress(f"epoch {epoch}/{self.args.epochs}  step {step_number}/{steps}  loss {loss:.4f}")

        order = mnist_mlp.epoch_order(len(self.train_split), self.order_generator).to(self.device)
        try:
            return mnist_mlp.train_epoch(
                self.step, self.train_split, order.split(self.args.batch_size), self.args.log_interval, log, stop
            )
        except mnist_mlp.NonFiniteLoss as error:
            raise self.diverged(f"{error} of epoch {epoch}", epoch) from None

    def diverged(self, what, epoch):
        """The error for a run gone non-finite; right after a resume, the checkpoint is the likelier cause."""
        first = self.args.resume and epoch == self.start_epoch + 1
        advice = f"resume from before {self.args.resume}" if first else "try a smaller --lr"
        return UsageError(f"{what} (--lr {self.args.lr} with {self.args.optimizer}); nothing of it was saved; {advice}")

    def evaluate(self, train_loss, seconds):
        """The epoch's figures: training loss, test (and validation) loss and accuracy, speed."""
        test = mnist_mlp.evaluate(self.model, self.test_split, self.args.test_batch_size)
        metrics = {
            "train_loss": train_loss,
            "test_loss": test.loss,
            "test_accuracy": test.accuracy,
            "test_correct": test.correct,
            "test_total": test.total,
            "seconds": seconds,
            "samples_per_s": len(self.train_split) / seconds,
        }
        if self.val_split is not None:
            val = mnist_mlp.evaluate(self.model, self.val_split, self.args.test_batch_size)
            metrics.update(val_loss=val.loss, val_accuracy=val.accuracy)
        return metrics

    def save(self, epoch, metrics):
        """Write the epoch's checkpoint, then its metrics.csv row; returns the checkpoint's path."""
        args = self.args
        path = os.path.join(args.checkpoint_dir, run_folder.CHECKPOINT_NAME.format(epoch=epoch))
        try:
            checkpoints.save_checkpoint(
                path,
                checkpoints.training_state(
                    self.model, self.optimizer, epoch, self.config, metrics, self.order_generator
                ),
            )
        except checkpoints.NonFiniteCheckpoint:  # the weights, Adam's state or a loss: the last update diverged
            raise self.diverged(f"the weights became non-finite in epoch {epoch}", epoch) from None
        except OSError as error:
            raise run_folder.WriteFailed(f"cannot write {path} ({error.strerror or error})") from None
        self.progress.last_checkpoint = path
        run_folder.add_metrics_row(args.checkpoint_dir, self.metrics_rows, epoch, metrics, self.config["run"])
        return path


def train_loop(run, stop, on_epoch=None):
    """The tutorial's loop: for each epoch, train, evaluate, save. Returns the exit code."""
    args = run.args
    run_folder.print_progress(f"training with the {run.step_description}")
    threads = f" ({torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})" * (run.device.type == "cpu")
    images = f"{len(run.train_split)} {args.dataset} images"
    run_folder.print_progress(f"on {run.device}{threads}, {images}, epochs {run.start_epoch + 1}..{args.epochs}")
    with fast_step.denormals_flushed():
        for epoch in range(run.start_epoch + 1, args.epochs + 1):
            run.progress.epoch = epoch
            # train: one pass over the shuffled training set, the loss printed every --log-interval steps
            started = time.perf_counter()
            result = run.train_one_epoch(epoch, stop)
            if result is None:  # Ctrl-C or SIGTERM, between two steps
                stop.finishing = True  # a second one now is not reported again, nor cuts the clean-up short
                run.progress.report_stop("stopped by SIGTERM" if stop.signal == signal.SIGTERM else "interrupted")
                return 143 if stop.signal == signal.SIGTERM else 130
            # evaluate on the test set (and held-out images); the mean loss waits for the device, then the time
            metrics = run.evaluate(result.mean_loss, time.perf_counter() - started)
            if on_epoch is not None:  # a caller's look at the epoch's step losses (study.py)
                on_epoch(epoch, result)
            # save the checkpoint and its metrics row; a Ctrl-C now waits until both are written
            with stop.save():
                path = run.save(epoch, metrics)
            run_folder.print_progress(f"epoch {epoch}/{args.epochs}  {run_folder.metrics_text(metrics)}  saved {path}")
        run.progress.epoch = None
    return 0


def train(args, progress, on_epoch=None):
    """Train as the flags say, leaving torch's threads and random generators as they were."""
    device = commands.resolve_device(args.device)  # GracefulStop first: its handlers cover the clean-up too
    with (
        run_folder.GracefulStop() as stop,
        commands.torch_threads(args.threads if device.type == "cpu" else torch.get_num_threads()),
        safe_files.folders_removed_if_left_empty(args.checkpoint_dir),
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
    ):
        run = Run(args, device, progress)
        with run_folder.FolderLock(args.checkpoint_dir):
            run.claim_folder()
            return train_loop(run, stop, on_epoch)


def main(argv=None, on_epoch=None):
    """train.py's program: main(["--epochs", "3"]) in a notebook, main() with the defaults; on_epoch(epoch, result)."""

    def body(argv):
        args = parse_args(argv)
        progress = run_folder.Progress(__file__, argv, args.resume, args.epochs)
        try:
            return train(args, progress, on_epoch)
        except run_folder.WriteFailed as error:
            progress.report_stop(f"error: {error}", where=False)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C during training
            progress.report_stop("interrupted")
            return 130

    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
