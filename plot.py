"""Training curves from train.py runs: python plot.py runs/adam-1 runs/sgd-1 [...] -o curves.png

Draws accuracy and loss per epoch, one colour per run, labelled by its folder's name: test accuracy,
and the training and test loss; the validation accuracy and loss too where a run held images out
(--val-size). Runs of one setting over several seeds (folders that differ only in a trailing -N, such
as adam-1, adam-2, adam-3) are drawn as their mean with a band from their min to their max.
Needs matplotlib (pip install matplotlib), an optional dependency of this project.
"""

import os
import re
import sys

from mnist_mlp_tools import commands, run_folder, safe_files
from mnist_mlp_tools.commands import UsageError

# matplotlib, an optional dependency: imported at its first use
figures, lines, backend_agg = commands.lazy_import(
    "matplotlib.figure", "matplotlib.lines", "matplotlib.backends.backend_agg"
)

# The panels and their curves: (metrics.csv column, which images, line style); a run draws the
# columns it has values in (validation only where it held images out).
PANELS = [
    ("accuracy (%)", [("test_accuracy", "test", "--"), ("val_accuracy", "validation", ":")]),
    (
        "loss (log scale)",
        [
            ("train_loss", "training, mean over the epoch", "-"),
            ("test_loss", "test", "--"),
            ("val_loss", "validation", ":"),
        ],
    ),
]
REQUIRED = ["epoch", "test_accuracy", "train_loss"]
COLUMNS = [column for _, curves in PANELS for column, _, _ in curves]


def parse_args(argv):
    parser = commands.ArgumentParser(description=__doc__.splitlines()[0].split(": ", 1)[0] + ".")
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR_OR_METRICS_CSV",
        help="train.py checkpoint folders (their metrics.csv is read) or metrics.csv files",
    )
    parser.add_argument("-o", "--output", default="curves.png", metavar="PATH.png", help="the picture to write")
    parser.add_argument("--title", default=None, help="the title above the two panels (default: the runs' names)")
    parser.add_argument(
        "--accuracy-from",
        type=float,
        default=None,
        metavar="PERCENT",
        help="start the accuracy axis here, to see close curves apart (default: fit the data)",
    )
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".png"):
        parser.error("--output must name a .png file")
    if args.accuracy_from is not None and not 0 <= args.accuracy_from < 100:
        parser.error(f"--accuracy-from must be a percentage from 0 up to 100, got {args.accuracy_from}")
    return args


def read_run(path):
    """(label, {column: [(epoch, value), ...]}) of one run: a folder with metrics.csv, or the CSV itself.
    The label is the folder's name (that of the current folder for "."); an empty cell is no value."""
    csv_path = os.path.join(path, run_folder.METRICS_NAME) if os.path.isdir(path) else path
    label = os.path.basename(os.path.abspath(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))))
    _, rows = run_folder.read_csv(csv_path)
    if not rows:
        raise UsageError(f"{csv_path} has no epochs: an empty run")
    missing = [column for column in REQUIRED if column not in rows[0]]
    if missing:
        raise UsageError(f"{csv_path} has no column {', '.join(missing)}: not a metrics.csv that train.py wrote")
    series = {column: [] for column in COLUMNS}
    for number, row in enumerate(rows, start=2):
        epoch = commands.whole_number(row["epoch"])
        if epoch is None:
            raise UsageError(f"{csv_path}, line {number}: its epoch {str(row['epoch'])[:20]!r} is not a whole number")
        for column in series:
            if row.get(column) in (None, ""):
                continue
            value = commands.decimal_number(row[column])
            highest = 100.0 if column.endswith("accuracy") else 1e6  # a percentage; a loss (log(10) at chance)
            if value is None or not 0 <= value <= highest:
                raise UsageError(
                    f"{csv_path}, line {number}: its {column} {str(row[column])[:20]!r} is not a number "
                    f"from 0 to {highest:g}"
                )
            series[column].append((epoch, value))
    return label, {column: values for column, values in series.items() if values}


def group_by_setting(runs):
    """{setting: [(label, series), ...]}, in first-seen order; a trailing -N (the seed) is dropped."""
    groups = {}
    for label, series in runs:
        groups.setdefault(re.sub(r"-\d+$", "", label), []).append((label, series))
    return groups


def spread(group, column):
    """(epochs, mean, min, max) of one column over the runs of a group, at the epochs all of them have."""
    per_run = [dict(series.get(column, [])) for _, series in group]
    epochs = sorted(set.intersection(*(set(values) for values in per_run)))
    if not epochs and column in REQUIRED:
        raise UsageError(
            f"the runs {', '.join(label for label, _ in group)} differ only in their seed but share no "
            "epoch: rename one to plot them apart"
        )
    values = [[values[epoch] for values in per_run] for epoch in epochs]
    return epochs, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def default_title(groups):
    """'Training curves of a, b and c' (or 'of N runs' where their names would not fit a line)."""
    names = list(groups)
    text = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"Training curves of {text}" if len(text) <= 80 else f"Training curves of {len(names)} settings"


def shown(text):
    """Text as matplotlib should print it: a $ is a dollar sign, not mathtext, and a leading _ does
    not hide a line from the legend."""
    text = commands.printable(text).replace("$", r"\$")  # a name's stray bytes as \xff: fonts cannot draw them
    return " " + text if text.startswith("_") else text


def draw(groups, path, title=None, accuracy_from=None):
    """Write the two-panel PNG: one colour per run (or a mean line and min-max band per setting),
    one line style per set of images."""
    # 4.62 in: a height whose 100 dpi is 462.0 pixels exactly (4.6 * 100 is 459.99..., which matplotlib
    # before 3.11 cuts to 459): the same picture on every matplotlib
    figure = figures.Figure(figsize=(11, 4.62), dpi=100, layout="constrained")
    backend_agg.FigureCanvasAgg(figure)  # no pyplot: no global figure state
    axes = figure.subplots(1, len(PANELS))
    drawn = set()  # the columns some run has: their line styles get a legend
    for axis, (name, curves) in zip(axes, PANELS):
        for color, (setting, group) in enumerate(groups.items()):
            color = f"C{color % 10}"
            for column, _, style in curves:
                epochs, mean, low, high = spread(group, column)
                if not epochs:
                    continue
                drawn.add(column)
                label = None
                if column == curves[0][0]:  # one legend entry per run or setting, on its first curve
                    label = shown(group[0][0] if len(group) == 1 else f"{setting} (mean of {len(group)}, min-max)")
                axis.plot(epochs, mean, style, marker=".", color=color, label=label)
                if len(group) > 1:
                    axis.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
        axis.set_xlabel("epoch")
        axis.set_ylabel(name)
        axis.grid(True, alpha=0.3, which="both")
        axis.xaxis.get_major_locator().set_params(integer=True)
    axes[1].set_yscale("log")  # losses a hundred times apart stay readable
    if accuracy_from is not None:
        axes[0].set_ylim(bottom=accuracy_from)
    axes[0].legend(fontsize=8, loc="lower right")
    styles = [
        lines.Line2D([], [], linestyle=style, color="black", label=text)
        for _, curves in PANELS[1:]
        for column, text, style in curves
        if column in drawn
    ]
    axes[1].legend(handles=styles, fontsize=8, loc="upper right")
    figure.suptitle(shown(title if title is not None else default_title(groups)))
    safe_files.atomic_write(path, lambda file: figure.savefig(file, format="png"))
    return figure


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        commands.require_matplotlib("plot.py")
        groups = group_by_setting([read_run(path) for path in args.runs])
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise UsageError(f"--output: no folder {folder}")
        for setting, group in groups.items():  # runs of one setting that cannot be averaged: refused before drawing
            if len(group) > 1:
                spread(group, REQUIRED[1])
        try:
            draw(groups, args.output, args.title, args.accuracy_from)
        except OSError as error:  # exit code 1, as for the other scripts' failed writes
            print(f"error: cannot write {args.output} ({error.strerror or error})", file=sys.stderr)
            return 1
        print(f"saved {args.output}: {sum(len(group) for group in groups.values())} runs in {len(groups)} settings")
        return 0

    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
