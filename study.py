"""The tutorial's two questions, measured: python study.py --out study [--quick]

Is Adam better than SGD, and what does Adam's bias correction do? Every run is train.py's own
(train.main, one folder a run under OUT/runs/, kept apart by epochs and held-out images), three seeds a
setting; a run is reused only where its whole description matches (study-run.json beside it), so a
stopped study goes on where it stopped and a --quick one never touches a full one's runs. Writes OUT/study.md
(the tables docs/study.md quotes) and, with matplotlib, the figures OUT/study_*.png. --quick: one epoch, one seed,
a reduced grid (tests, a first look).
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import plot
import train
from mnist_mlp_tools import commands, run_folder, safe_files
from mnist_mlp_tools.commands import UsageError

mnist_mlp, checkpoints, data_files, models, pictures = commands.lazy_import(
    "mnist_mlp",
    "mnist_mlp_tools.checkpoints",
    "mnist_mlp_tools.data_files",
    "mnist_mlp_tools.models",
    "mnist_mlp_tools.pictures",
)


def parse_args(argv):
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[0] + ".")
    parser.add_argument("--out", required=True, help="the study's folder (runs/, study.md, figures)")
    parser.add_argument("--quick", action="store_true", help="one epoch, one seed, a reduced grid")
    parser.add_argument(
        "--val-size",
        type=commands.bounded_int(1, 59999),
        default=5000,
        help="images held out for choosing the learning rate",
    )
    commands.add_data_dir_flag(parser)
    return parser.parse_args(argv)


BETAS = (0.9, 0.999)


@dataclass
class Setting:
    """One line of a table: train.py's flags, and what the study changes around train.py."""

    name: str
    flags: list
    epochs: int = 20
    step_losses: bool = False  # keep each step's loss of the first 1,000 steps
    val_size: int = 0  # training images held out (train.py --val-size)
    seeds: tuple = field(default=(1, 2, 3))

    @property
    def inputs(self):
        """The input scaling its flags choose (train.py --inputs)."""
        return self.flags[self.flags.index("--inputs") + 1] if "--inputs" in self.flags else "tutorial"


class Study:
    """The runs of a study under OUT/runs/, each done once, and what they measured."""

    def __init__(self, out, data_dir):
        self.out, self.data_dir = out, data_dir
        self.done = self.total = 0
        self.splits = None  # the data, read once for every measure of the runs

    def runs_folder(self, setting):
        """Runs of other lengths or held-out sizes are kept apart: a --quick study never cuts down a full one."""
        return os.path.join(self.out, "runs", f"epochs{setting.epochs}-val{setting.val_size}")

    def folder(self, setting, seed):
        return os.path.join(self.runs_folder(setting), f"{setting.name}-{seed}")

    def description(self, setting, seed):
        """Everything that makes a run what it is: reused only where all of it matches."""
        return {
            "flags": [str(flag) for flag in setting.flags],
            "epochs": setting.epochs,
            "seed": seed,
            "val_size": setting.val_size,
            "step_losses": setting.step_losses,
        }

    def train_seed(self, setting, seed):
        """Train one seed of a setting with train.main, unless a complete run of the same description is
        there already; a folder holding a run of another description is refused, never replaced."""
        folder = self.folder(setting, seed)
        self.done += 1
        label = f"[{self.done}/{self.total}] {setting.name} seed {seed}"
        description = self.description(setting, seed)
        if (
            os.path.exists(folder)
            and os.listdir(folder)
            and read_json(os.path.join(folder, RUN_DESCRIPTION)) != description
        ):
            raise UsageError(
                f"{folder} holds a run this study did not describe so (other flags, or not this study's): "
                "move it away or choose another --out; nothing was changed"
            )
        if self.complete(setting, folder):
            print(f"{label}: reused", flush=True)
            return
        os.makedirs(folder, exist_ok=True)
        write_json(os.path.join(folder, RUN_DESCRIPTION), description)
        argv = [
            *setting.flags,
            "--epochs",
            setting.epochs,
            "--seed",
            seed,
            "--data-dir",
            self.data_dir,
            "--checkpoint-dir",
            folder,
            "--overwrite",
            "--device",
            "cpu",
        ]
        if setting.val_size:
            argv += ["--val-size", setting.val_size]
        losses = []  # the first 1,000 steps' losses, as train.py hands each epoch's over (not read from its log)

        def keep_step_losses(epoch, result):
            losses.extend(result.step_losses.tolist()[: 1000 - len(losses)])

        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # train.py's log: the study prints a line a run
            code = train.main(argv, on_epoch=keep_step_losses if setting.step_losses else None)
        if code == 1:  # a failed write (a full disk): exit 1, as every script's
            raise run_folder.WriteFailed(f"{label}: train.py could not write its files (exit code 1)")
        if code != 0:
            raise UsageError(f"{label}: train.py stopped with exit code {code}")
        if setting.step_losses:
            write_json(os.path.join(folder, "steps.json"), losses)
        last = run_folder.read_metrics(os.path.join(folder, run_folder.METRICS_NAME))[-1]
        print(
            f"{label}: {setting.epochs} epochs, test accuracy {last['test_accuracy']}%, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )

    def complete(self, setting, folder):
        path = os.path.join(folder, run_folder.METRICS_NAME)
        steps = not setting.step_losses or read_steps(folder) is not None
        try:
            rows = run_folder.read_metrics(path) if os.path.exists(path) else []
        except UsageError:
            return False
        return steps and len(rows) == setting.epochs

    def metrics(self, setting, column):
        """[{epoch: value} for each seed] of one metrics.csv column."""
        result = []
        for seed in setting.seeds:
            rows = run_folder.read_metrics(os.path.join(self.folder(setting, seed), run_folder.METRICS_NAME))
            result.append({int(row["epoch"]): float(row[column]) for row in rows if row[column]})
        return result

    def data(self):
        """(train Split, test Split), read once for every measure below."""
        if self.splits is None:
            self.splits = data_files.load(self.data_dir)
        return self.splits

    def models(self, setting, epoch):
        """(seed, the model its run saved after `epoch`, its input scaling) for each seed of a setting."""
        for seed in setting.seeds:
            path = os.path.join(self.folder(setting, seed), run_folder.CHECKPOINT_NAME.format(epoch=epoch))
            checkpoint = checkpoints.load_checkpoint(path)
            yield seed, models.model_from_checkpoint(path, checkpoint), checkpoints.input_scaling(checkpoint)

    def train_accuracy(self, setting, epoch):
        """Accuracy (%) on the training images a run trained on (the held-out ones left out), eval mode,
        one per seed."""
        train, _ = self.data()
        accuracies = []
        for seed, model, scaling in self.models(setting, epoch):
            trained_on = mnist_mlp.split_validation(train, setting.val_size, seed)[0]
            accuracies.append(mnist_mlp.evaluate(model, dataclasses.replace(trained_on, scaling=scaling)).accuracy)
        return accuracies

    def dead_units(self, setting, epoch):
        """fc1 units that are zero after ReLU on every test image, one count per seed (inputs scaled as trained)."""
        _, test = self.data()
        return [
            int(pictures.silent_units(model, dataclasses.replace(test, scaling=scaling)).sum())
            for _, model, scaling in self.models(setting, epoch)
        ]


RUN_DESCRIPTION = "study-run.json"  # beside each run's checkpoints: what the run is


def write_json(path, value):
    """Write JSON whole or not at all (a kill or a full disk mid-write leaves the old file or none)."""
    safe_files.atomic_write(path, lambda file: file.write(json.dumps(value).encode()))


def read_json(path):
    """The JSON in `path`, or None where there is none or it does not parse."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def read_steps(folder):
    """A run's first step losses (steps.json), checked: 1 to 1,000 finite numbers; None otherwise."""
    losses = read_json(os.path.join(folder, "steps.json"))
    if not (
        isinstance(losses, list)
        and 0 < len(losses) <= 1000
        and all(type(loss) in (int, float) and math.isfinite(loss) for loss in losses)
    ):
        return None
    return losses


def spread(values, digits=2):
    """'mean (min–max)' of a few numbers (counts: digits=0, the mean with one decimal)."""
    mean = f"{sum(values) / len(values):.{max(digits, 1)}f}"
    return (
        f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})" if len(values) > 1 else f"{values[0]:.{digits}f}"
    )


def multiplier(t, betas=BETAS):
    """How much larger Adam's update is without bias correction, at step t (exact with eps = 0)."""
    return (1 - betas[0] ** t) / math.sqrt(1 - betas[1] ** t)


def plan(quick, val_size=5000):
    """The study's settings, by table; the fair comparison holds val_size training images out."""
    epochs, seeds = (1, (1,)) if quick else (20, (1, 2, 3))
    early = 1 if quick else 5

    def setting(name, flags, **extra):
        return Setting(name, flags, **{"epochs": epochs, "seeds": seeds, **extra})

    adam = ["--optimizer", "adam"]
    optimizers = [
        setting("adam-lr0.001", [*adam, "--lr", "0.001"]),
        setting("adam-no-bias-correction-lr0.001", ["--optimizer", "adam-no-bias-correction", "--lr", "0.001"]),
        setting("sgd-momentum0.9-lr0.01", ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.01"]),
        setting("sgd-lr0.1", ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.1"]),
        setting("sgd-lr0.01", ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.01"]),
        setting("sgd-lr0.001", ["--optimizer", "sgd", "--momentum", "0", "--lr", "0.001"]),
    ]
    if quick:
        optimizers = [optimizers[0], optimizers[2]]
    lrs = ["0.001", "0.03"] if quick else ["0.001", "0.003", "0.01", "0.03"]
    bias = [
        setting(f"bias-{kind}-lr{lr}", ["--optimizer", kind, "--lr", lr], epochs=early, step_losses=True)
        for lr in lrs
        for kind in ("adam", "adam-no-bias-correction")
    ]
    grid = {
        "adam": ["0.0003", "0.001", "0.003"],
        "sgd-momentum0.9": ["0.003", "0.01", "0.03"],
        "sgd": ["0.03", "0.1", "0.3"],
    }
    if quick:
        grid = {name: lrs[:2] for name, lrs in grid.items() if name != "sgd"}
    fair = {
        name: [
            setting(
                f"fair-{name}-lr{lr}",
                ["--optimizer", name.split("-")[0], "--lr", lr, "--momentum", "0.9" if "momentum" in name else "0"],
                val_size=val_size,
            )
            for lr in lrs
        ]
        for name, lrs in grid.items()
    }
    scaling = [
        setting("inputs01-adam-lr0.001", [*adam, "--lr", "0.001", "--inputs", "zero-one"]),
        setting("inputs01-sgd-momentum0.9-lr0.01", ["--optimizer", "sgd", "--lr", "0.01", "--inputs", "zero-one"]),
    ]
    decay = [
        setting("adam-l2-0.01", [*adam, "--lr", "0.001", "--weight-decay", "0.01"]),
        setting("adamw-0.01", ["--optimizer", "adamw", "--lr", "0.001", "--weight-decay", "0.01"]),
    ]
    return {"optimizers": optimizers, "bias": bias, "fair": fair, "scaling": scaling, "decay": decay}


def epochs_shown(settings):
    """(the last epoch, the epochs the tables show, the words for the last 10 epochs)."""
    last = settings["optimizers"][0].epochs
    shown = [epoch for epoch in (1, 5, 10, 20) if epoch <= last]
    return last, shown, "the last 10 epochs (11–20)" if last >= 20 else f"the last {min(10, last)} epoch(s)"


def optimizer_tables(study, settings):
    """The optimizers at the tutorial's settings, and how much their accuracy moves between epochs."""
    last, shown, tail_text = epochs_shown(settings)
    lines = [
        "## Optimizers at the tutorial's settings",
        "",
        "| setting | " + " | ".join(f"acc. epoch {e}" for e in shown) + " | train loss, last epoch | "
        f"mean acc. over {tail_text} |",
        "|---" * (len(shown) + 3) + "|",
    ]
    for setting in settings["optimizers"]:
        accuracy, loss = study.metrics(setting, "test_accuracy"), study.metrics(setting, "train_loss")
        tail = [sum(run[e] for e in run if e > last - 10) / min(10, last) for run in accuracy]
        lines.append(
            f"| {setting.name} | "
            + " | ".join(spread([run[e] for run in accuracy]) for e in shown)
            + f" | {sum(run[last] for run in loss) / len(loss):.4f} | {spread(tail)} |"
        )

    lines += [
        "",
        "## How much test accuracy moves from one epoch to the next",
        "",
        "The largest fall and rise of test accuracy (points) between two consecutive epochs, over all seeds: "
        "from epoch 1 to 2 (still learning), and between later epochs (after epoch 5).",
        "",
        "| setting | epoch 1 → 2 | after epoch 5: largest fall | largest rise |",
        "|---|---|---|---|",
    ]
    for setting in settings["optimizers"]:
        accuracy = study.metrics(setting, "test_accuracy")
        first = [run[2] - run[1] for run in accuracy if 2 in run]
        later = [run[e + 1] - run[e] for run in accuracy for e in run if e >= 5 and e + 1 in run]
        lines.append(
            f"| {setting.name} | "
            + (f"{min(first):+.2f} to {max(first):+.2f}" if first else "—")
            + " | "
            + (f"{min(later):+.2f} | {max(later):+.2f}" if later else "— | —")
            + " |"
        )

    return lines


def bias_tables(study, settings):
    """Bias correction against the learning rate, and the multiplier it removes."""
    early = settings["bias"][0].epochs
    epochs_text = "after epoch 1" + (f" and {early}" if early > 1 else "")
    lines = [
        "",
        "## Bias correction × learning rate",
        "",
        f"Test accuracy (%) {epochs_text}; fc1 units dead after epoch 1.",
        "",
        "| lr | Adam, epoch 1 | without correction, epoch 1 | Adam, epoch "
        + str(early)
        + " | without, epoch "
        + str(early)
        + " | dead fc1 units: Adam | without |",
        "|---" * 7 + "|",
    ]
    if early == 1:  # a --quick study: epoch 1 is also the last
        lines[-1:] = [
            "| lr | Adam, epoch 1 | without correction, epoch 1 | dead fc1 units: Adam | without |",
            "|---" * 5 + "|",
        ]
    for corrected, uncorrected in zip(settings["bias"][::2], settings["bias"][1::2]):
        cells = [
            spread([run[epoch] for run in study.metrics(s, "test_accuracy")])
            for epoch in sorted({1, early})
            for s in (corrected, uncorrected)
        ]
        dead = [spread(study.dead_units(s, 1), 0) for s in (corrected, uncorrected)]
        lines.append(f"| {corrected.flags[-1]} | " + " | ".join(cells) + " | " + " | ".join(dead) + " |")
    lines += [
        "",
        "Without the correction the update is the corrected one times (1−β1ᵗ)/√(1−β2ᵗ):",
        "",
        "| step t | 1 | 10 | 12 | 100 | 938 | 1000 | 5000 |",
        "|---" * 8 + "|",
        "| multiplier | " + " | ".join(f"{multiplier(t):.2f}" for t in (1, 10, 12, 100, 938, 1000, 5000)) + " |",
        "",
        f"Its mean over epoch 1 (steps 1–938): {sum(multiplier(t) for t in range(1, 939)) / 938:.2f}. "
        "The first uncorrected step is lr·(1−β1)/√(1−β2) = "
        f"{(1 - BETAS[0]) / math.sqrt(1 - BETAS[1]):.2f}·lr: larger than the corrected lr exactly when "
        f"β2 > 1−(1−β1)² = {1 - (1 - BETAS[0]) ** 2:.2f}.",
    ]

    return lines


def fair_tables(study, settings):
    """Each optimizer's lr chosen on validation, and the chosen settings' fit: (lines, chosen)."""
    lines = [
        "",
        "## A fair comparison: each optimizer's lr chosen on validation",
        "",
        f"{settings['fair']['adam'][0].val_size} training images held out; "
        "the mean of the last 5 epochs (or fewer) per seed.",
        "",
        "| optimizer | lr | validation acc. | test acc. | chosen |",
        "|---|---|---|---|---|",
    ]
    chosen = {}
    for name, grid in settings["fair"].items():
        scores = {}
        for setting in grid:
            window = lambda run: [run[e] for e in run if e > setting.epochs - 5]  # noqa: E731
            val = [sum(window(run)) / len(window(run)) for run in study.metrics(setting, "val_accuracy")]
            test = [sum(window(run)) / len(window(run)) for run in study.metrics(setting, "test_accuracy")]
            scores[setting.name] = (sum(val) / len(val), val, test, setting)
        best = max(scores, key=lambda key: scores[key][0])
        chosen[name] = scores[best][3]
        for key, (_, val, test, setting) in scores.items():
            lines.append(
                f"| {name} | {setting.flags[3]} | {spread(val)} | {spread(test) if key == best else '—'} | "
                f"{'←' if key == best else ''} |"
            )

    lines += [
        "",
        "### The chosen settings: fit and generalisation at the last epoch",
        "",
        "Accuracy (%) on the training images the run trained on (eval mode, the held-out ones left out) and "
        "on the test set, both at the last epoch; the test loss's range from epoch 9 on.",
        "",
        "| optimizer | train acc. | test acc. | train loss (last epoch, mean over it) | test loss from epoch 9 |",
        "|---|---|---|---|---|",
    ]
    for name, setting in chosen.items():
        train_accuracy = study.train_accuracy(setting, setting.epochs)
        test = [run[setting.epochs] for run in study.metrics(setting, "test_accuracy")]
        loss = [run[setting.epochs] for run in study.metrics(setting, "train_loss")]
        test_loss = [value for run in study.metrics(setting, "test_loss") for epoch, value in run.items() if epoch >= 9]
        lines.append(
            f"| {name}, lr {setting.flags[3]} | {spread(train_accuracy)} | {spread(test)} | "
            f"{sum(loss) / len(loss):.4f} | "
            + (f"{min(test_loss):.4f}–{max(test_loss):.4f}" if test_loss else "—")
            + " |"
        )

    return lines, chosen


def more_tables(study, settings):
    """What three seeds can show, the inputs' scaling, dead units, weight decay against AdamW."""
    last, shown, tail_text = epochs_shown(settings)
    lines = [
        "",
        "## What three seeds can show",
        "",
        f"A test accuracy near 97.5% on 10,000 images has a binomial standard error of "
        f"{100 * math.sqrt(0.975 * 0.025 / 10000):.2f} points. With 3 seeds a side, an exact rank test "
        "(Mann–Whitney) can give no two-sided p-value below "
        f"{2 / math.comb(6, 3):.2f}: all three of one above all three of the other.",
        "",
        "## Inputs in [0, 1] against the tutorial's [−1, 1]",
        "",
        f"Test accuracy (%): at the last epoch and the mean over {tail_text}.",
        "",
        "| optimizer | [−1, 1]: last | [0, 1]: last | [−1, 1]: mean | [0, 1]: mean |",
        "|---|---|---|---|---|",
    ]
    for scaled in settings["scaling"]:
        plain = next(
            setting
            for setting in settings["optimizers"]
            if setting.flags == scaled.flags or setting.name == scaled.name.replace("inputs01-", "")
        )
        cells = []
        for setting in (plain, scaled):
            accuracy = study.metrics(setting, "test_accuracy")
            cells.append(
                (
                    spread([run[last] for run in accuracy]),
                    spread([sum(run[e] for e in run if e > last - 10) / min(10, last) for run in accuracy]),
                )
            )
        lines.append(
            f"| {scaled.name.replace('inputs01-', '')} | {cells[0][0]} | {cells[1][0]} | {cells[0][1]} | "
            f"{cells[1][1]} |"
        )

    lines += [
        "",
        "## Dead ReLU units",
        "",
        "fc1 units (of 128) that are zero on every test image.",
        "",
        "| setting | inputs | after epoch 1 | after the last epoch |",
        "|---|---|---|---|",
    ]
    for setting in [*settings["optimizers"], *settings["scaling"]]:
        inputs = "[0, 1]" if setting.inputs == "zero-one" else "[−1, 1]"
        lines.append(
            f"| {setting.name} | {inputs} | {spread(study.dead_units(setting, 1), 0)} | "
            f"{spread(study.dead_units(setting, setting.epochs), 0)} |"
        )

    lines += [
        "",
        "## Adam with weight decay against AdamW (decay 0.01, lr 0.001)",
        "",
        "| optimizer | " + " | ".join(f"acc. epoch {e}" for e in shown) + " |",
        "|---" * (len(shown) + 1) + "|",
    ]
    for setting in settings["decay"]:
        accuracy = study.metrics(setting, "test_accuracy")
        lines.append(f"| {setting.name} | " + " | ".join(spread([run[e] for run in accuracy]) for e in shown) + " |")
    return lines


def report(study, settings):
    """study.md: the tables, in the order docs/study.md answers the questions."""
    every = [
        setting
        for group in settings.values()
        for setting in (group if isinstance(group, list) else [s for grid in group.values() for s in grid])
    ]
    read = sorted({os.path.relpath(study.runs_folder(setting), study.out) for setting in every})
    seeds = settings["optimizers"][0].seeds
    over = (
        f"mean over seeds {', '.join(map(str, seeds))} (min–max in brackets)"
        if len(seeds) > 1
        else f"seed {seeds[0]} alone"
    )
    lines = [
        "# The study's tables",
        "",
        f"Test accuracy (%) and training loss, {over}.",
        "",
        f"Runs read: {', '.join(read)} (epochs of each run, and training images held out); each run's "
        f"full description is the {RUN_DESCRIPTION} beside its checkpoints.",
        "",
    ]
    lines += optimizer_tables(study, settings) + bias_tables(study, settings)
    fair, chosen = fair_tables(study, settings)
    lines += fair + more_tables(study, settings)
    safe_files.atomic_write(
        os.path.join(study.out, "study.md"), lambda file: file.write(("\n".join(lines) + "\n").encode())
    )
    return chosen


def figures(study, settings, chosen):
    """The PNGs: the optimizers' curves (plot.py's picture), bias correction (step losses, the
    multiplier), and the fair comparison's test accuracy and test loss."""
    runs = [plot.read_run(study.folder(setting, seed)) for setting in settings["optimizers"] for seed in setting.seeds]
    plot.draw(
        plot.group_by_setting(runs),
        os.path.join(study.out, "study_curves.png"),
        f"MNIST MLP, {len(settings['optimizers'][0].seeds)} seed(s) each: test accuracy and training loss",
        accuracy_from=None,
    )

    figure = pictures.figures.Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2)
    for number, setting in enumerate(settings["bias"]):
        losses = read_steps(study.folder(setting, setting.seeds[0]))  # checked complete by Study.run
        # a running mean of up to 20 steps, from step 1 (the first steps' peak is the point)
        smooth = [sum(losses[max(0, t - 20) : t]) / (t - max(0, t - 20)) for t in range(1, len(losses) + 1)]
        left.plot(
            range(1, len(losses) + 1),
            smooth,
            color=f"C{number // 2}",
            linewidth=1,
            linestyle="-" if number % 2 == 0 else ":",
            label=f"lr {setting.flags[-1]}" + ("" if number % 2 == 0 else ", no correction"),
        )
    left.set(xlabel="step", ylabel="training loss, mean of the last 20 steps", yscale="log")
    left.set_title(f"seed {settings['bias'][0].seeds[0]}, from step 1", fontsize=10)
    left.legend(fontsize=7)
    steps = range(1, 3001)
    right.plot(steps, [multiplier(t) for t in steps])
    right.axhline(1, color="grey", linewidth=0.5)
    right.set(xlabel="step t", ylabel="update without correction / with", xscale="log")
    right.set_title("(1 − β1ᵗ) / √(1 − β2ᵗ)", fontsize=10)
    pictures.save(figure, os.path.join(study.out, "study_bias_correction.png"))

    figure = pictures.figures.Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    axes = figure.subplots(1, 2)
    for number, (name, setting) in enumerate(chosen.items()):  # on validation: what the choice was made on
        for axis, column in zip(axes, ("val_accuracy", "val_loss")):
            runs = study.metrics(setting, column)
            epochs = sorted(runs[0])
            values = [[run[e] for run in runs] for e in epochs]
            axis.plot(
                epochs,
                [sum(v) / len(v) for v in values],
                marker=".",
                color=f"C{number}",
                label=f"{name}, lr {setting.flags[3]} (mean of {len(runs)} seeds, min–max)",
            )
            axis.fill_between(
                epochs, [min(v) for v in values], [max(v) for v in values], color=f"C{number}", alpha=0.2, linewidth=0
            )
    axes[0].set(xlabel="epoch", ylabel="validation accuracy (%)")
    axes[1].set(xlabel="epoch", ylabel="validation loss")
    axes[0].legend(fontsize=8)
    pictures.save(figure, os.path.join(study.out, "study_fair.png"))


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        try:  # the output folder checked before the first run, not by each run's train.py
            os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
        except OSError as error:
            raise UsageError(f"cannot use --out {args.out} as the study's folder ({error.strerror or error})") from None
        settings = plan(args.quick, args.val_size)
        study = Study(args.out, args.data_dir)
        everything = [*settings["optimizers"], *settings["bias"], *settings["scaling"], *settings["decay"]]
        fair = [setting for grid in settings["fair"].values() for setting in grid]
        study.total = sum(len(setting.seeds) for setting in everything + fair)
        started = time.perf_counter()
        try:
            return run_all(args, study, settings, everything, fair, started)
        except run_folder.WriteFailed as error:
            print(f"error: {error}", file=sys.stderr)
            return 1

    return commands.run_main(body, argv)


def run_all(args, study, settings, everything, fair, started):
    """Every run (reused where done), then study.md and the figures; returns the exit code."""
    for setting in everything:
        for seed in setting.seeds:
            study.train_seed(setting, seed)
    for setting in fair:
        for seed in setting.seeds:
            study.train_seed(setting, seed)
    try:
        chosen = report(study, settings)
        figures(study, settings, chosen)
        pictures = "and the figures study_curves.png, study_bias_correction.png, study_fair.png"
    except ImportError:
        pictures = "(no figures: pip install matplotlib)"
    except OSError as error:  # a full disk under --out: exit 1, as every script's failed write
        raise run_folder.WriteFailed(f"cannot write into {args.out} ({error.strerror or error})") from None
    print(f"wrote {os.path.join(args.out, 'study.md')} {pictures} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    commands.script(main)
