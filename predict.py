"""Read your own handwriting: python predict.py noteLearning_20.pth my_seven.png [more images or folders]

Each image is prepared as MNIST's digits were (see handwriting.digit_pixels): light ink on
black, the ink scaled to 20 pixels and centred by mass in 28x28. Then the model says which class
it is, how sure it is, and the next two guesses. A file named after its true class (7_a.png,
3.jpg) counts toward an accuracy line. --show draws each input beside what the model saw.
"""

import json
import os
import re
import sys

from PIL import Image, ImageDraw, ImageFont, ImageOps

from mnist_mlp_tools import commands
from mnist_mlp_tools.commands import UsageError
from mnist_mlp_tools.safe_files import atomic_write, is_regular_file

checkpoints, handwriting, models = commands.lazy_import(
    "mnist_mlp_tools.checkpoints", "mnist_mlp_tools.handwriting", "mnist_mlp_tools.models"
)

IMAGE_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pbm")


def parse_args(argv):
    parser = commands.ArgumentParser(
        description="Classify your own images of handwritten digits with a trained checkpoint."
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint written by train.py (.pth)")
    parser.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, or folders (every image in them, sorted); a name that starts with "
        "the true class and _ or . (7_a.png) is scored",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    parser.add_argument(
        "--show", metavar="PATH.png", help="save a picture of each input beside the 28x28 the model saw, with its guess"
    )
    commands.add_device_flag(parser)
    commands.add_trust_pickle_flag(parser)
    args = parser.parse_args(argv)
    if args.show:
        commands.png_path(parser, "--show", args.show)
    commands.existing_file(args.checkpoint, "checkpoint")
    return args


def image_paths(arguments):
    """The files to read: each IMAGE as given, a folder as its image files in sorted order."""
    paths = []
    for argument in arguments:
        if os.path.isdir(argument):
            names = sorted(name for name in os.listdir(argument) if name.lower().endswith(IMAGE_ENDINGS))
            paths += [os.path.join(argument, name) for name in names]
        else:
            paths.append(argument)
    return paths


def missing_path_text(path):
    """'no such file or folder', where it was looked for, and the bundled one of that name if there is one
    (predict.py data/digits, run from another folder)."""
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
    hint = f"; there is one beside predict.py: {beside}" if not os.path.isabs(path) and os.path.exists(beside) else ""
    return f"no such file or folder{commands.looked_in(path)}{hint}"


def true_label(path, classes):
    """The class a file name starts with (7_a.png, 3.jpg, 12_x.png for a 12-class set), or None."""
    match = re.match(r"(\d+)[_.]", os.path.basename(path), re.ASCII)
    return int(match.group(1)) if match and int(match.group(1)) < len(classes) else None


def read_image(path):
    """The PIL image at `path`, decoded; a one-line ValueError for anything that is not a usable image."""
    if not os.path.lexists(path):
        raise ValueError(missing_path_text(path))
    if not is_regular_file(path):
        raise ValueError("not a regular file")
    return handwriting.decode_image(path)


def predictions(model, classes, paths, keep_pictures=False, scaling="tutorial"):
    """Yield one result dict per path as it is read (a prediction or an error). The decoded picture is
    dropped at once; with keep_pictures, for --show, its small copy and the 28x28 the model saw are kept.
    scaling: the checkpoint's input scaling (checkpoints.input_scaling)."""
    for path in paths:
        result = {"image": path}
        label = true_label(path, classes)
        if label is not None:
            result["label"] = classes[label]
        try:
            image = read_image(path)
            pixels = handwriting.digit_pixels(image)
        except ValueError as error:  # any failure to read one file (handwriting's rule): its error line, not the run's
            result["error"] = str(error)
        if "error" in result:
            yield result
            continue
        top = handwriting.class_probabilities(model, pixels, scaling).topk(3)
        result.update(
            prediction=classes[int(top.indices[0])],
            probability=round(float(top.values[0]), 4),
            top3=[[classes[int(index)], round(float(value), 4)] for value, index in zip(*top)],
        )
        if label is not None:
            result["correct"] = int(top.indices[0]) == label
        if keep_pictures:
            result["_thumbnail"], result["_pixels"] = thumbnail(image), pixels
        del image  # before the next picture is decoded: one at a time in memory
        yield result


def thumbnail(image, cell=84):
    """The picture fitted in a cell x cell square, on white, as RGB: what --show draws of the input."""
    try:
        small = ImageOps.contain(image, (cell, cell))  # shrunk in its own mode: no full-size copy
    except ValueError:  # a mode PIL does not resize: converted first
        small = ImageOps.contain(image.convert("RGBA"), (cell, cell))
    small = small.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", small.size, "white"), small).convert("RGB")


def save_picture(path, results, cell=84):
    """Each input (fitted in a square) beside the 28x28 the model saw, captioned with the guess."""
    shown = [result for result in results if "_pixels" in result]
    try:  # a font with arrows and check marks where the system has one; PIL's own has neither
        font, arrow, good, bad = ImageFont.truetype("DejaVuSans.ttf", 12), "→", "✓", "✗"
    except OSError:
        font, arrow, good, bad = ImageFont.load_default(), "->", "ok", "wrong"
    row_height, width = cell + 40, 2 * cell + 40
    columns = min(4, max(1, len(shown)))
    rows = max(1, (len(shown) + columns - 1) // columns)
    sheet = Image.new("RGB", (columns * width, rows * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for number, result in enumerate(shown):
        left, top = (number % columns) * width + 4, (number // columns) * row_height + 4
        sheet.paste(result["_thumbnail"], (left, top))
        seen = Image.frombytes("L", (28, 28), bytes(result["_pixels"].flatten().tolist()))
        sheet.paste(seen.resize((cell, cell), Image.Resampling.NEAREST).convert("RGB"), (left + cell + 28, top))
        draw.text((left + cell + 6, top + cell // 2 - 8), arrow, fill="black", font=font)
        caption = f"{result['prediction']} ({100 * result['probability']:.0f}%)"
        if "correct" in result:
            caption += f" {good if result['correct'] else bad}"
        name = commands.printable(os.path.basename(result["image"]))
        name = name if len(name) <= 30 else name[:29] + "…"
        draw.text((left, top + cell + 3), name, fill="black", font=font)
        draw.text((left, top + cell + 18), caption, fill="black", font=font)
    atomic_write(path, lambda file: sheet.save(file, format="PNG"))


def report(results, as_json):
    """Print each result as it comes (errors on stderr), then the accuracy; returns the results kept
    for --show (those with pictures) and the number of errors."""
    kept, labelled, correct, failed = [], 0, 0, 0
    if as_json:
        print('{"predictions": [', flush=True)
    for number, result in enumerate(results):
        if "_pixels" in result:
            kept.append(result)
        labelled += "correct" in result
        correct += bool(result.get("correct"))
        if "error" in result:  # on stderr in both forms; the JSON holds it too
            failed += 1
            print(f"error: {commands.printable(result['image'])}: {result['error']}", file=sys.stderr, flush=True)
        if as_json:
            public = {key: value for key, value in result.items() if not key.startswith("_")}
            print(("  " if number == 0 else ", ") + json.dumps(public, allow_nan=False, ensure_ascii=False), flush=True)
            continue
        if "error" in result:
            continue
        rest = ", ".join(f"{name} ({100 * value:.1f}%)" for name, value in result["top3"][1:])
        truth = ""
        if "correct" in result:
            truth = "  right" if result["correct"] else f"  wrong: it is {result['label']}"
        print(
            f"{commands.printable(result['image'])}: {result['prediction']} ({100 * result['probability']:.1f}%), "
            f"then {rest}{truth}",
            flush=True,
        )
    accuracy = round(100 * correct / labelled, 2) if labelled else None
    if as_json:
        print(f'], "accuracy": {json.dumps(accuracy)}, "correct": {correct}, "labelled": {labelled}}}')
    elif labelled:
        print(f"accuracy over {labelled} labelled images: {correct}/{labelled} = {accuracy:.2f}%")
    return kept, failed


def main(argv=None):
    def body(argv):
        args = parse_args(argv)
        device = commands.resolve_device(args.device)
        checkpoint = checkpoints.load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle)
        model = models.model_from_checkpoint(args.checkpoint, checkpoint, device).eval()
        classes = checkpoints.dataset_classes(checkpoint)
        paths = image_paths(args.images)
        if not paths:
            raise UsageError(f"no images in {', '.join(args.images)} (looked for {', '.join(IMAGE_ENDINGS)})")
        with commands.torch_threads(1):  # one picture is tiny work: more threads only wait for each other
            results = predictions(model, classes, paths, bool(args.show), checkpoints.input_scaling(checkpoint))
            kept, failed = report(results, args.json)
        if args.show:
            try:
                save_picture(args.show, kept)
            except OSError as error:
                print(f"error: cannot write {args.show} ({error.strerror or error})", file=sys.stderr)
                return 1
            if not args.json:
                print(f"saved {args.show}")
        return 2 if failed else 0

    return commands.run_main(body, argv)


if __name__ == "__main__":
    commands.script(main)
