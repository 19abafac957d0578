"""Test accuracy of saved checkpoints: python evaluate.py noteLearning_20.pth [more.pth ...]"""

import dataclasses
import json
import math
import os
import re
import sys

from mnist_mlp_tools import commands

mnist_mlp, checkpoints, data_files, models, pictures = commands.lazy_import(
    "mnist_mlp",
    "mnist_mlp_tools.checkpoints",
    "mnist_mlp_tools.data_files",
    "mnist_mlp_tools.models",
    "mnist_mlp_tools.pictures",
)


def parse_args(argv):
    parser = commands.ArgumentParser(description="Report test accuracy and loss of NoteModel checkpoints.")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files (.pth)")
    commands.add_data_dir_flag(parser)
    commands.add_device_flag(parser)
    parser.add_argument(
        "--batch-size", type=commands.bounded_int(1, 1_000_000), default=1000, help="evaluation batch size"
    )
    parser.add_argument("--json", action="store_true", help="print JSON: an object for one file, a list for several")
    parser.add_argument("--per-class", action="store_true", help="also print the accuracy of each class")
    parser.add_argument("--confusion", action="store_true", help="also print the confusion matrix (rows = true class)")
    group = parser.add_argument_group("pictures (one checkpoint; --save-weights and --save-confusion need matplotlib)")
    group.add_argument(
        "--save-errors",
        metavar="PATH.png",
        help="the first 64 misclassified test images, captioned 'true → predicted (confidence)'",
    )
    group.add_argument(
        "--save-weights", metavar="PATH.png", help="fc1's weights, one 28x28 tile per hidden unit, dead units boxed"
    )
    group.add_argument(
        "--save-confusion", metavar="PATH.png", help="the confusion matrix as a heatmap, the counts in its cells"
    )
    commands.add_trust_pickle_flag(parser)
    args = parser.parse_args(argv)
    for flag, path in picture_flags(args):
        if len(args.checkpoints) != 1:
            parser.error(f"{flag} takes exactly one checkpoint")
        commands.png_path(parser, flag, path)  # checked before the evaluation, so a bad path costs nothing computed
    paths = [path for _, path in picture_flags(args)]
    if len(set(paths)) < len(paths):
        parser.error("each picture needs a file of its own")
    for path in args.checkpoints:
        commands.existing_file(path, "checkpoint")
    return args


def picture_flags(args):
    """[(flag, path)] of the pictures asked for."""
    return [
        (flag, path)
        for flag, path in (
            ("--save-errors", args.save_errors),
            ("--save-weights", args.save_weights),
            ("--save-confusion", args.save_confusion),
        )
        if path
    ]


def evaluate_checkpoints(args):
    """(one result dict per checkpoint, [(flag, path, why)] of pictures not written); data is read once per dataset."""
    device = commands.resolve_device(args.device)
    splits = {}  # dataset -> (train, test), each read once
    results = []
    for path in sorted(args.checkpoints, key=natural_order):  # one checkpoint in memory at a time
        checkpoint = checkpoints.load_checkpoint(path, trust_pickle=args.trust_pickle)
        model = models.model_from_checkpoint(path, checkpoint, device)  # the NoteModel in mnist_mlp.py
        if args.save_weights:  # before any work: the picture needs a first nn.Linear(784, units)
            try:
                pictures.first_linear(model)
            except ValueError as error:
                raise commands.UsageError(f"--save-weights: {error}") from None
        config = checkpoint["config"]
        dataset = config.get("dataset", "mnist")
        if dataset not in splits:
            train_split, test_split = data_files.load(args.data_dir, dataset)
            splits[dataset] = (train_split, test_split.to(device))
        classes, scaling = mnist_mlp.DATASETS[dataset][1], checkpoints.input_scaling(checkpoint)  # as it was trained
        test_split = dataclasses.replace(splits[dataset][1], scaling=scaling)
        evaluation = mnist_mlp.evaluate(model, test_split, args.batch_size, len(classes))
        result = {
            "checkpoint": path,
            "epoch": checkpoint["epoch"],
            "dataset": dataset,
            **summary(evaluation),
            "classes": classes,
            "per_class": [round(value, 2) for value in evaluation.per_class],
            "confusion": evaluation.confusion.tolist(),
        }
        if config.get("val_size"):  # the images train.py held out, drawn again from the recorded seed
            try:
                _, val_split = mnist_mlp.split_validation(splits[dataset][0], config["val_size"], config["seed"])
            except ValueError:
                raise commands.UsageError(
                    f"{path}: its config holds out {config['val_size']} validation images, "
                    f"but the training set has {len(splits[dataset][0])}"
                ) from None
            val_split = dataclasses.replace(val_split.to(device), scaling=scaling)
            result["validation"] = summary(mnist_mlp.evaluate(model, val_split, args.batch_size, len(classes)))
        results.append(result)
    return results, save_pictures(args, model, test_split, results[0])  # pictures: one checkpoint only


def save_pictures(args, model, test_split, result):
    """Write the pictures asked for; [(flag, path, why it failed)] for those that could not be written."""
    title = commands.printable(os.path.basename(result["checkpoint"]))
    made = {
        "--save-errors": lambda: pictures.error_grid(model, test_split, result["classes"], title)[0],
        "--save-weights": lambda: pictures.weight_tiles(model, test_split, title),
        "--save-confusion": lambda: pictures.confusion_heatmap(result["confusion"], result["classes"], title),
    }
    failures = []
    for flag, path in picture_flags(args):
        try:
            pictures.save(made[flag](), path)
        except OSError as error:  # the figures above are still printed
            failures.append((flag, path, f"cannot write {path} ({error.strerror or error})"))
    return failures


def natural_order(path):
    """Sort key: noteLearning_2.pth before noteLearning_10.pth (the shell's glob puts 10 first)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path, flags=re.ASCII)]


def summary(evaluation):
    """The figures of one evaluation; a non-finite loss is None (JSON has no NaN)."""
    loss = round(evaluation.loss, 6) if math.isfinite(evaluation.loss) else None
    return {
        "accuracy": round(evaluation.accuracy, 2),
        "correct": evaluation.correct,
        "total": evaluation.total,
        "loss": loss,
    }


def best_index(results):
    """The index of the best validation accuracy, or None unless every run held images out: the best test
    accuracy would choose the model on the images that measure it."""
    if all("validation" in result for result in results):
        return max(range(len(results)), key=lambda i: results[i]["validation"]["accuracy"])
    return None


NO_VALIDATION = (
    "no best marked: choosing by test accuracy chooses on the images that measure the model; "
    "train with --val-size 5000 to hold out 5000 training images, and the best by them is marked"
)


def loss_text(loss):
    """A mean loss for the table: 4 decimals, or "not finite" where the logits overflowed (JSON: null)."""
    return "not finite" if loss is None else f"{loss:.4f}"


PICTURE_NAMES = {
    "--save-errors": "misclassified examples",
    "--save-weights": "fc1's weights",
    "--save-confusion": "the confusion heatmap",
}


def print_results(results, args, saved):
    results = [{**result, "checkpoint": commands.printable(result["checkpoint"])} for result in results]
    if len(results) == 1:
        result = results[0]
        print(
            f"{result['checkpoint']} (epoch {result['epoch']}, {result['dataset']} test set): "
            f"accuracy {result['correct']}/{result['total']} = {result['accuracy']:.2f}%, "
            f"mean loss {loss_text(result['loss'])}"
        )
        if "validation" in result:
            val = result["validation"]
            print(
                f"validation ({val['total']} held-out training images): "
                f"accuracy {val['correct']}/{val['total']} = {val['accuracy']:.2f}%, mean loss {loss_text(val['loss'])}"
            )
    else:
        best = best_index(results)
        by_validation = best is not None  # then the table shows what it ranks by
        width = max(len("checkpoint"), *(len(result["checkpoint"]) for result in results))
        print(
            f"{'checkpoint':<{width}}  epoch  accuracy      correct    loss" + ("  val acc." if by_validation else "")
        )
        for number, result in enumerate(results):
            mark = "  <- best validation accuracy" if number == best else ""
            val = f"  {result['validation']['accuracy']:>8.2f}%" if by_validation else ""
            print(
                f"{result['checkpoint']:<{width}}  {result['epoch']:>5}  {result['accuracy']:>7.2f}%  "
                f"{result['correct']:>5}/{result['total']:<5}  {loss_text(result['loss']):>6}{val}{mark}"
            )
        if not by_validation:
            print(NO_VALIDATION)
    for result in results:
        label = f"{result['checkpoint']}: " if len(results) > 1 else ""
        names = result["classes"]
        if args.per_class:
            print(f"{label}accuracy per class:")
            for name, value in zip(names, result["per_class"]):
                print(f"  {name:>11}  {value:6.2f}%")
        if args.confusion:
            print(f"{label}confusion matrix (rows = true class, columns = predicted):")
            short = [name[:5] for name in names]
            print("       " + "".join(f"{name:>6}" for name in short))
            for name, row in zip(short, result["confusion"]):
                print(f"{name:>6} " + "".join(f"{count:>6}" for count in row))
    for flag, path in saved:
        print(f"saved {PICTURE_NAMES[flag]} to {path}")


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        drawn = [flag for flag, _ in picture_flags(args) if flag != "--save-errors"]  # --save-errors needs PIL only
        if drawn:
            commands.require_matplotlib("evaluate.py " + " and ".join(drawn))
        results, failures = evaluate_checkpoints(args)
        failed = {flag for flag, _, _ in failures}
        if args.json:
            print(
                json.dumps(results[0] if len(results) == 1 else results, indent=2, allow_nan=False, ensure_ascii=False)
            )
        else:
            print_results(results, args, [(flag, path) for flag, path in picture_flags(args) if flag not in failed])
        for _, _, why in failures:
            print(f"error: {why}", file=sys.stderr)
        return 1 if failures else 0

    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
