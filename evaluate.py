"""Test accuracy of saved checkpoints: python evaluate.py noteLearning_20.pth [more.pth ...]"""

import json
import math
import re
import sys

import commands

def parse_args(argv):
    parser = commands.ArgumentParser(description="Report test accuracy and loss of NoteModel checkpoints.")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="checkpoint files (.pth)")
    commands.add_data_dir_flag(parser)
    commands.add_device_flag(parser)
    parser.add_argument("--batch-size", type=commands.bounded_int(1, 1_000_000), default=1000,
                        help="evaluation batch size")
    parser.add_argument("--json", action="store_true", help="print JSON: an object for one file, a list for several")
    parser.add_argument("--per-class", action="store_true", help="also print the accuracy of each class")
    parser.add_argument("--confusion", action="store_true", help="also print the confusion matrix (rows = true class)")
    parser.add_argument("--save-errors", metavar="PATH.png",
                        help="save a grid of up to 64 misclassified test images, captioned true->predicted")
    commands.add_trust_pickle_flag(parser)
    args = parser.parse_args(argv)
    if args.save_errors and len(args.checkpoints) != 1:
        parser.error("--save-errors takes exactly one checkpoint")
    if args.save_errors:  # checked before the evaluation, so a bad path costs nothing computed
        commands.png_path(parser, "--save-errors", args.save_errors)
    for path in args.checkpoints:
        commands.existing_file(path, "checkpoint")
    return args


if __name__ == "__main__":  # the flags first: --help, a mistyped flag or file answer before torch loads
    commands.flags_first(parse_args)

import checkpoints  # noqa: E402  (after the flags, on purpose)
import data_files  # noqa: E402
import mnist_mlp  # noqa: E402
from safe_files import atomic_write  # noqa: E402


def evaluate_checkpoints(args):
    """(one result dict per checkpoint, why --save-errors failed or None); data is read once per dataset."""
    device = commands.resolve_device(args.device)
    splits = {}  # dataset -> (train, test), each read once
    results = []
    for path in sorted(args.checkpoints, key=natural_order):  # one checkpoint in memory at a time
        checkpoint = checkpoints.load_checkpoint(path, trust_pickle=args.trust_pickle)
        model = checkpoints.model_from_checkpoint(path, checkpoint, device)  # the NoteModel in mnist_mlp.py
        config = checkpoint["config"]
        dataset = config.get("dataset", "mnist")
        if dataset not in splits:
            train_split, test_split = data_files.load(args.data_dir, dataset)
            splits[dataset] = (train_split, test_split.to(device))
        classes = mnist_mlp.DATASETS[dataset][1]
        evaluation = mnist_mlp.evaluate(model, splits[dataset][1], args.batch_size, len(classes))
        result = {
            "checkpoint": path, "epoch": checkpoint["epoch"], "dataset": dataset,
            **summary(evaluation),
            "classes": classes,
            "per_class": [round(value, 2) for value in evaluation.per_class],
            "confusion": evaluation.confusion.tolist(),
        }
        if config.get("val_size"):  # the images train.py held out, drawn again from the recorded seed
            try:
                _, val_split = mnist_mlp.split_validation(splits[dataset][0], config["val_size"], config["seed"])
            except ValueError:
                raise commands.UsageError(f"{path}: its config holds out {config['val_size']} validation images, "
                                          f"but the training set has {len(splits[dataset][0])}") from None
            result["validation"] = summary(mnist_mlp.evaluate(model, val_split.to(device), args.batch_size, len(classes)))
        results.append(result)
    if args.save_errors:
        try:
            save_error_grid(args.save_errors, model, splits[results[0]["dataset"]][1], results[0]["classes"])
        except OSError as error:  # the figures above are still printed
            return results, f"cannot write {args.save_errors} ({error.strerror or error})"
    return results, None


def natural_order(path):
    """Sort key: noteLearning_2.pth before noteLearning_10.pth (the shell's glob puts 10 first)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def summary(evaluation):
    """The figures of one evaluation; a non-finite loss is None (JSON has no NaN)."""
    loss = round(evaluation.loss, 6) if math.isfinite(evaluation.loss) else None
    return {"accuracy": round(evaluation.accuracy, 2), "correct": evaluation.correct,
            "total": evaluation.total, "loss": loss}


def best_index(results):
    """(index, what it is best by): by validation accuracy where every run held some images out.

    Picking by test accuracy would make the test set part of the choice; validation exists for it.
    """
    if all("validation" in result for result in results):
        return max(range(len(results)), key=lambda i: results[i]["validation"]["accuracy"]), "validation accuracy"
    return max(range(len(results)), key=lambda i: (results[i]["accuracy"], -(results[i]["loss"] or math.inf))), \
        "test accuracy"


def save_error_grid(path, model, split, class_names, columns=8, scale=2):
    """A PNG of up to 64 misclassified images, each captioned 'true→predicted'."""
    from PIL import Image, ImageDraw, ImageFont

    indices, predictions = mnist_mlp.misclassified(model, split)
    try:  # a font with an arrow where the system has one; PIL's built-in font has no "→"
        font, arrow = ImageFont.truetype("DejaVuSans.ttf", 11), "→"
    except OSError:
        font, arrow = ImageFont.load_default(), "->"
    captions = [f"{class_names[int(split.labels[i])]}{arrow}{class_names[int(p)]}"
                for i, p in zip(indices, predictions)]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    text_width = max([measure.textlength(caption, font=font) for caption in captions] + [0])
    cell_width = max(28 * scale, int(text_width) + 4)
    cell_height = 28 * scale + 14
    rows = max(1, (len(captions) + columns - 1) // columns)
    grid = Image.new("L", (columns * cell_width, rows * cell_height), color=255)
    draw = ImageDraw.Draw(grid)
    for number, (index, caption) in enumerate(zip(indices, captions)):
        left, top = (number % columns) * cell_width, (number // columns) * cell_height
        digit = Image.fromarray(split.pixels[index].view(28, 28).cpu().numpy(), mode="L")
        grid.paste(digit.resize((28 * scale, 28 * scale)), (left + (cell_width - 28 * scale) // 2, top))
        draw.text((left + 2, top + 28 * scale + 1), caption, fill=0, font=font)
    atomic_write(path, lambda file: grid.save(file, format="PNG"))
    return len(captions)


def loss_text(loss):
    """A mean loss for the table: 4 decimals, or "not finite" where the logits overflowed (JSON: null)."""
    return "not finite" if loss is None else f"{loss:.4f}"


def print_results(results, args, saved_errors):
    if len(results) == 1:
        result = results[0]
        print(f"{result['checkpoint']} (epoch {result['epoch']}, {result['dataset']} test set): "
              f"accuracy {result['correct']}/{result['total']} = {result['accuracy']:.2f}%, "
              f"mean loss {loss_text(result['loss'])}")
        if "validation" in result:
            val = result["validation"]
            print(f"validation ({val['total']} held-out training images): "
                  f"accuracy {val['correct']}/{val['total']} = {val['accuracy']:.2f}%, mean loss {loss_text(val['loss'])}")
    else:
        best, best_by = best_index(results)
        by_validation = best_by == "validation accuracy"  # then the table shows what it ranks by
        width = max(len("checkpoint"), *(len(result["checkpoint"]) for result in results))
        print(f"{'checkpoint':<{width}}  epoch  accuracy      correct    loss" + ("  val acc." if by_validation else ""))
        for number, result in enumerate(results):
            mark = f"  <- best {best_by}" if number == best else ""
            val = f"  {result['validation']['accuracy']:>8.2f}%" if by_validation else ""
            print(f"{result['checkpoint']:<{width}}  {result['epoch']:>5}  {result['accuracy']:>7.2f}%  "
                  f"{result['correct']:>5}/{result['total']:<5}  {loss_text(result['loss']):>6}{val}{mark}")
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
    if saved_errors:
        print(f"saved misclassified examples to {args.save_errors}")


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        results, save_failure = evaluate_checkpoints(args)
        if args.json:
            print(json.dumps(results[0] if len(results) == 1 else results, indent=2, allow_nan=False, ensure_ascii=False))
        else:
            print_results(results, args, saved_errors=args.save_errors and save_failure is None)
        if save_failure is not None:
            print(f"error: {save_failure}", file=sys.stderr)
            return 1
        return 0
    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
