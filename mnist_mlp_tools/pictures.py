"""Pictures of a trained model, for evaluate.py and the lesson notebooks: fc1's weights as images,
the confusion matrix as a heatmap, and the misclassified test digits.

weight_tiles and confusion_heatmap return matplotlib Figures (matplotlib is optional: imported when
called, and no pyplot, so no global figure state); error_grid returns a PIL image. save() writes
either atomically.
"""

import math

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

import mnist_mlp

from .commands import lazy_import
from .safe_files import atomic_write

# matplotlib is optional: imported at its first use, by the pictures that need it
figures, patches, colors, backend_agg = lazy_import(
    "matplotlib.figure", "matplotlib.patches", "matplotlib.colors", "matplotlib.backends.backend_agg"
)

MAX_TILES = 256  # a wide first layer shows its first 256 units: more would be too small to see


def first_linear(model):
    """The model's first layer, if it is an nn.Linear taking the 784 pixels; ValueError otherwise."""
    leaves = [module for module in model.modules() if not list(module.children())]
    first = leaves[0] if leaves else None
    if not (isinstance(first, nn.Linear) and first.in_features == 28 * 28):
        what = type(first).__name__ if first is not None else "no layer"
        raise ValueError(f"the weight picture needs a first layer nn.Linear(784, units); this model's first is {what}")
    return first


@torch.no_grad()
def silent_units(model, split, batch_size=1000):
    """(units,) bool: the first layer's units whose output is <= 0 on every image of `split`, so
    that a ReLU after it is 0 for all of them (a dead unit: it passes no gradient, and never learns)."""
    layer = first_linear(model)
    highest = torch.full((layer.out_features,), -math.inf, device=layer.weight.device)
    for start in range(0, len(split), batch_size):
        rows = mnist_mlp.normalize(split.pixels[start : start + batch_size], split.scaling).reshape(
            -1, 28 * 28
        )  # (N, 784)
        highest = torch.maximum(highest, layer(rows).amax(0))  # (units,)
    return highest <= 0


def weight_tiles(model, split, title=None, columns=16):
    """A Figure: each unit of the first layer as a 28x28 image of its weights, red positive and blue
    negative on a colour scale centred at 0, the units silent on every image of `split` boxed."""
    layer = first_linear(model)
    silent = silent_units(model, split).cpu()
    weights = layer.weight.detach().float().cpu()[:MAX_TILES]  # (units shown, 784)
    units = len(weights)
    columns = min(columns, units)
    rows = math.ceil(units / columns)
    mosaic = torch.full((rows * 29 + 1, columns * 29 + 1), math.nan)  # 1-pixel gaps, drawn blank
    for unit, row in enumerate(weights):
        top, left = 1 + (unit // columns) * 29, 1 + (unit % columns) * 29
        mosaic[top : top + 28, left : left + 28] = row.view(28, 28)
    limit = float(weights.abs().max()) or 1.0
    figure = figures.Figure(figsize=(columns * 0.6 + 1.5, rows * 0.6 + 1.2), dpi=100, layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
    for unit in range(units):
        if silent[unit]:
            top, left = (unit // columns) * 29, (unit % columns) * 29
            axis.add_patch(patches.Rectangle((left, top), 29, 29, fill=False, edgecolor="black", linewidth=1.5))
    axis.set_axis_off()
    figure.colorbar(image, ax=axis, shrink=0.8, label="weight")
    shown = f"the first {units} of {layer.out_features} units" if units < layer.out_features else f"{units} units"
    figure.suptitle(f"{title + ': ' if title else ''}first layer, {shown}, each unit's 784 weights as a 28x28 image")
    axis.set_title(
        f"boxed: {int(silent[:units].sum())} units silent (output <= 0) on all {len(split):,} test images", fontsize=9
    )
    return figure


def confusion_heatmap(confusion, class_names, title=None):
    """A Figure of the confusion matrix (rows = true class): every count written in its cell, the
    diagonal (right answers) in green and the errors in red on a log scale, so that a few stand out."""
    counts = torch.as_tensor(confusion).cpu()
    classes = len(counts)
    diagonal = torch.eye(classes, dtype=torch.bool)
    errors = counts.double().masked_fill(diagonal | (counts == 0), math.nan)
    right = counts.double().masked_fill(~diagonal, math.nan)
    size = max(5.0, 0.55 * classes + 2)
    figure = figures.Figure(figsize=(size + 1, size), dpi=100, layout="constrained")
    axis = figure.subplots()
    most = max(2.0, float(errors.nan_to_num(0).max()))
    if bool(torch.isfinite(errors).any()):
        image = axis.imshow(errors.numpy(), cmap="Reds", norm=colors.LogNorm(vmin=1, vmax=most))
        figure.colorbar(image, ax=axis, shrink=0.8, label="errors (log scale)")
    axis.imshow(right.numpy(), cmap="Greens", vmin=0, vmax=max(1, int(counts.max())) * 1.4)
    for row in range(classes):
        for column in range(classes):
            count = int(counts[row, column])
            dark = row != column and count > 0 and math.log(count) > 0.6 * math.log(most)  # white on deep red
            axis.text(
                column,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=8,
                color="lightgray" if count == 0 else "white" if dark else "black",
                fontweight="bold" if row == column else "normal",
            )
    names = [str(name) for name in class_names]
    axis.set_xticks(
        range(classes),
        names,
        rotation=45 if max(map(len, names)) > 2 else 0,
        ha="right" if max(map(len, names)) > 2 else "center",
    )
    axis.set_yticks(range(classes), names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    correct, total = int(counts.diagonal().sum()), int(counts.sum())
    axis.set_title(f"{title + ': ' if title else ''}{correct:,} of {total:,} right, {total - correct:,} errors")
    return figure


def misclassified(model, split, batch_size=1000):
    """(indices, predictions) of every misclassified sample of `split`, in order."""
    predictions = torch.cat([logits.argmax(1) for _, logits in mnist_mlp.logits_in_batches(model, split, batch_size)])
    wrong = (predictions != split.labels).nonzero().flatten()
    return wrong.cpu(), predictions[wrong].cpu()


def error_grid(model, split, class_names, title, limit=64):
    """A PIL image of the first `limit` misclassified images of `split`, each captioned
    'true → predicted (confidence)', under a title that says how many there are in all."""
    wrong, predicted = misclassified(model, split)  # every error, in one pass
    wrong_total, indices, predictions = len(wrong), wrong[:limit], predicted[:limit]
    shown = split.subset(indices.to(split.pixels.device))  # eval mode, as logits_in_batches gives it back
    logits = [logits for _, logits in mnist_mlp.logits_in_batches(model, shown)]
    probabilities = torch.softmax(torch.cat(logits), 1).cpu() if logits else torch.zeros(0, len(class_names))
    confidence = probabilities[torch.arange(len(indices)), predictions]
    try:  # a font with an arrow where the system has one; PIL's built-in font has no "→"
        font, heading, arrow = ImageFont.truetype("DejaVuSans.ttf", 14), ImageFont.truetype("DejaVuSans.ttf", 16), "→"
    except OSError:
        font = heading = ImageFont.load_default()
        arrow = "->"
    captions = [
        f"{class_names[int(split.labels[i])]} {arrow} {class_names[int(p)]} ({100 * float(c):.0f}%)"
        for i, p, c in zip(indices, predictions, confidence)
    ]
    scale, columns = 3, 8
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    cell_width = max([28 * scale] + [int(measure.textlength(caption, font=font)) + 10 for caption in captions])
    cell_height = 28 * scale + 22
    lines = [
        f"{title}: true {arrow} predicted (confidence)",
        f"the first {len(captions)} of {wrong_total} misclassified images"
        if wrong_total > len(captions)
        else f"all {wrong_total} misclassified images",
    ]
    header = 2 * 22 + 8
    width = max(columns * cell_width, *(int(measure.textlength(line, font=heading)) + 16 for line in lines))
    rows = max(1, math.ceil(len(captions) / columns))
    grid = Image.new("L", (width, header + rows * cell_height), color=255)
    draw = ImageDraw.Draw(grid)
    for number, line in enumerate(lines):
        draw.text((8, 6 + 22 * number), line, fill=0, font=heading)
    for number, (index, caption) in enumerate(zip(indices, captions)):
        left, top = (number % columns) * cell_width, header + (number // columns) * cell_height
        digit = Image.frombytes("L", (28, 28), bytes(split.pixels[index].cpu().tolist()))
        grid.paste(digit.resize((28 * scale, 28 * scale), Image.NEAREST), (left + (cell_width - 28 * scale) // 2, top))
        draw.text((left + 5, top + 28 * scale + 2), caption, fill=0, font=font)
    return grid, wrong_total


def save(picture, path):
    """Write a Figure or a PIL image as a PNG at `path`, whole or not at all."""
    if hasattr(picture, "savefig"):
        backend_agg.FigureCanvasAgg(picture)
        atomic_write(path, lambda file: picture.savefig(file, format="png"))
    else:
        atomic_write(path, lambda file: picture.save(file, format="PNG"))
