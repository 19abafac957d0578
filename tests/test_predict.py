"""predict.py and the preparation of your own handwriting (handwriting.digit_pixels)."""

import io
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

import mnist_mlp
from mnist_mlp_tools import checkpoints, handwriting, models
from tests.conftest import ROOT, assert_usage_error, run_main


def as_user_would_have_it(pixels, rng):
    """An MNIST digit (784 bytes) re-rendered as a user's picture: dark ink on (sometimes grey) paper,
    scaled up 3-6x, placed off centre, sometimes with salt noise."""
    from PIL import Image, ImageChops, ImageOps

    digit = Image.frombytes("L", (28, 28), bytes(pixels.tolist()))
    scale = rng.randint(3, 6)
    ink = ImageOps.invert(digit.resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    width, height = 28 * scale + rng.randint(10, 80), 28 * scale + rng.randint(10, 80)
    picture = Image.new("L", (width, height), rng.choice([255, 255, 215]))
    left, top = rng.randint(0, width - 28 * scale), rng.randint(0, height - 28 * scale)
    box = (left, top, left + 28 * scale, top + 28 * scale)
    picture.paste(ImageChops.darker(picture.crop(box), ink), box[:2])
    if rng.random() < 0.4:
        speckles = picture.load()
        for _ in range(width * height // 500):
            speckles[rng.randrange(width), rng.randrange(height)] = rng.randint(0, 80)
    return picture


def test_predict_reads_digits_as_a_user_would_have_them(trained, mnist, tmp_path, capsys):
    import random

    import predict

    _, test_split = mnist
    count, rng = 300, random.Random(0)
    folder = tmp_path / "digits"
    folder.mkdir()
    for index in range(count):
        label = int(test_split.labels[index])
        as_user_would_have_it(test_split.pixels[index], rng).save(folder / f"{label}_{index:03d}.png")
    checkpoint = trained[0] / "noteLearning_1.pth"
    model = models.model_from_checkpoint(checkpoint, checkpoints.load_checkpoint(str(checkpoint))).eval()
    with torch.no_grad():
        predictions = model(mnist_mlp.normalize(test_split.pixels[:count])).argmax(1)
    original = 100 * float((predictions == test_split.labels[:count]).float().mean())
    code, out, _ = run_main(predict, [checkpoint, folder, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and report["labelled"] == count
    assert abs(report["accuracy"] - original) <= 2.0, (report["accuracy"], original)
    first = report["predictions"][0]
    assert set(first) >= {"image", "prediction", "probability", "top3", "label", "correct"}
    assert len(first["top3"]) == 3 and first["top3"][0] == [first["prediction"], first["probability"]]


def test_an_mnist_image_passes_through_unchanged(mnist):
    from PIL import Image

    _, test_split = mnist
    for index in range(20):
        image = Image.frombytes("L", (28, 28), bytes(test_split.pixels[index].tolist()))
        assert torch.equal(handwriting.digit_pixels(image), test_split.pixels[index].view(28, 28))


def test_prepared_digits_have_mnist_geometry():
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (300, 200), (0, 0, 0, 0))  # transparent means paper
    ImageDraw.Draw(image).line([(40, 20), (60, 180)], fill=(0, 0, 0, 255), width=12)
    pixels = handwriting.digit_pixels(image).float()
    rows, columns = (pixels > 0).any(1).nonzero().flatten(), (pixels > 0).any(0).nonzero().flatten()
    assert int(rows[-1] - rows[0] + 1) == 20 and int(columns[-1] - columns[0] + 1) < 20
    centre = [float((pixels.sum(axis) * torch.arange(28)).sum() / pixels.sum()) for axis in (1, 0)]
    assert all(abs(value - 14) <= 0.5 for value in centre)
    sixteen_bit = Image.new("I;16", (120, 120), 65535)
    ImageDraw.Draw(sixteen_bit).ellipse([(30, 20), (90, 100)], outline=0, width=10)
    assert int(handwriting.digit_pixels(sixteen_bit).max()) > 200


def test_predict_reports_bad_images_one_line_each_and_the_rest(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image, ImageDraw

    import predict

    good = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(good).line([(30, 6), (30, 54)], fill=0, width=5)
    good.save(tmp_path / "1_good.jpg")
    (tmp_path / "text.png").write_text("not an image")
    Image.new("L", (50, 50), 255).save(tmp_path / "blank.png")
    Image.new("L", (80, 80), 255).save(tmp_path / "huge.png")
    monkeypatch.setattr(handwriting, "MAX_PIXELS", 5000)  # so that an 80x80 image stands for a 100-megapixel photo
    checkpoint = trained[0] / "noteLearning_1.pth"
    code, out, err = run_main(
        predict,
        [
            checkpoint,
            tmp_path / "missing.png",
            tmp_path / "text.png",
            tmp_path / "blank.png",
            tmp_path / "huge.png",
            tmp_path / "1_good.jpg",
            "--show",
            tmp_path / "show.png",
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert "1_good.jpg: 1 (" in out and "accuracy over 1 labelled images: 1/1" in out
    errors = err.strip().splitlines()
    assert len(errors) == 4 and all(line.startswith("error: ") for line in errors)
    for name, words in (
        ("missing.png", "no such file"),
        ("text.png", "not an image"),
        ("blank.png", "no ink"),
        ("huge.png", "more than the 5,000"),
    ):
        assert any(name in line and words in line for line in errors), (name, errors)
    assert (tmp_path / "show.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_usage_error(
        *run_main(predict, [checkpoint, tmp_path / "1_good.jpg", "--show", tmp_path / "x.jpg"], capsys)[::2], ".png"
    )


def test_predict_uses_the_checkpoints_class_names(tmp_path, capsys):
    from PIL import Image, ImageDraw

    import predict

    torch.manual_seed(0)
    torch.save(
        {"model": mnist_mlp.NoteModel().state_dict(), "epoch": 1, "config": {"dataset": "fashion-mnist"}},
        tmp_path / "fashion.pth",
    )
    image = Image.new("L", (64, 64), 255)
    ImageDraw.Draw(image).rectangle([(16, 8), (48, 56)], fill=0)
    image.save(tmp_path / "coat.png")
    code, out, _ = run_main(predict, [tmp_path / "fashion.pth", tmp_path / "coat.png", "--json"], capsys)
    names = mnist_mlp.DATASETS["fashion-mnist"][1]
    assert code == 0 and json.loads(out)["predictions"][0]["prediction"] in names


def test_the_bundled_sample_digits_are_read(trained, capsys):
    """Quick start's first predict.py run has pictures to read: eight digits drawn with PIL."""
    import predict

    folder = os.path.join(ROOT, "data", "digits")
    code, out, err = run_main(predict, [trained[0] / "noteLearning_1.pth", folder, "--json"], capsys)
    report = json.loads(out)
    assert code == 0 and err == "" and report["labelled"] == 8
    assert report["correct"] >= 6  # one epoch's model; the 20-epoch one read all eight


def test_every_failure_of_one_image_is_that_images_error_line(trained, mnist, tmp_path, capsys):
    """Whatever a decoder raises on one file, the other images are still read and reported; a blank
    28x28 has no ink either; float images are scaled by their range; names stay readable in JSON."""
    from PIL import Image

    import predict

    _, test_split = mnist
    digit = test_split.pixels[0].view(28, 28)  # a 7, light on black: MNIST's own form
    Image.frombytes("L", (28, 28), bytes(digit.flatten().tolist())).save(tmp_path / "7_我的.png")
    Image.new("L", (28, 28), 0).save(tmp_path / "black28.png")
    (digit.float() / 255).numpy().tofile(tmp_path / "raw.bin")  # the same 7 as floats in [0, 1]
    Image.frombytes("F", (28, 28), (tmp_path / "raw.bin").read_bytes()).save(tmp_path / "7_float.tif")
    nan_rows = torch.full((28, 28), float("nan"))
    Image.frombytes("F", (28, 28), nan_rows.numpy().tobytes()).save(tmp_path / "nan.tif")
    png = bytearray((tmp_path / "7_我的.png").read_bytes())
    start = png.index(b"IDAT") + 8
    png[start : start + 20] = bytes(20)  # a corrupt chunk: PIL knows the format, its decoder fails
    (tmp_path / "corrupt.png").write_bytes(bytes(png))
    files = ["7_我的.png", "black28.png", "7_float.tif", "nan.tif", "corrupt.png"]
    code, out, err = run_main(
        predict, [trained[0] / "noteLearning_1.pth", *[tmp_path / name for name in files], "--json"], capsys
    )
    report = json.loads(out)
    assert code == 2 and "Traceback" not in err and "我的" in out  # UTF-8, not \u6211
    by_name = {os.path.basename(result["image"]): result for result in report["predictions"]}
    assert by_name["7_我的.png"]["prediction"] == "7" and by_name["7_float.tif"]["prediction"] == "7"
    assert by_name["7_float.tif"]["probability"] == by_name["7_我的.png"]["probability"]
    assert "no ink" in by_name["black28.png"]["error"] and "NaN" in by_name["nan.tif"]["error"]
    assert "cannot read it" in by_name["corrupt.png"]["error"]
    assert len(err.strip().splitlines()) == 3 and ": NaN" not in out and "NaN," not in out


def test_predict_reads_one_picture_at_a_time_and_keeps_none_unless_shown(trained, monkeypatch):
    """predictions() is a stream: a result for each picture as it is read, the decoded picture dropped."""
    import predict

    read = []
    real = predict.read_image
    monkeypatch.setattr(predict, "read_image", lambda path: read.append(path) or real(path))
    checkpoint = checkpoints.load_checkpoint(str(trained[0] / "noteLearning_1.pth"))
    model = models.model_from_checkpoint("x", checkpoint)
    digits = sorted(
        os.path.join(ROOT, "data", "digits", name) for name in os.listdir(os.path.join(ROOT, "data", "digits"))
    )
    stream = predict.predictions(model, [str(d) for d in range(10)], digits)
    first = next(stream)
    assert read == digits[:1] and not any(key.startswith("_") for key in first)  # nothing kept without --show
    shown = next(predict.predictions(model, [str(d) for d in range(10)], digits, keep_pictures=True))
    assert (
        shown["_thumbnail"].size[0] <= 84 and shown["_thumbnail"].size[1] <= 84 and shown["_pixels"].shape == (28, 28)
    )


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="peak memory from ru_maxrss of a child, in KiB on Linux")
def test_predicts_peak_memory_does_not_grow_with_the_number_of_pictures(trained, tmp_path):
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (2500, 2500), "white")  # 19 MB decoded, a small PNG
    ImageDraw.Draw(photo).line([(1250, 300), (1250, 2200)], fill="black", width=150)
    photo.save(tmp_path / "1_photo.png")
    for number in range(2, 25):
        os.link(tmp_path / "1_photo.png", tmp_path / f"1_photo{number:02d}.png")

    def start(paths):  # the wrapper prints its child's peak resident memory, in KiB on Linux
        code = (
            "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
        )
        # A fixed mmap threshold: glibc's sliding one puts the blocks after a freed 16 MiB one on the heap,
        # whose fragmentation moves the peak by up to ~50 MiB from run to run, whatever the program keeps.
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                sys.executable,
                os.path.join(ROOT, "predict.py"),
                str(trained[0] / "noteLearning_1.pth"),
                *map(str, paths),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20)),
        )

    pictures = sorted(tmp_path.glob("1_photo*.png"))
    runs = [start(pictures[:6]), start(pictures)]  # at once: each is its own process
    few, many = (int(run.communicate(timeout=300)[0]) * 1024 for run in runs)
    # A picture kept is 19 MB more (6.25 MB for its grey copy); past the first few, nothing grows.
    assert many - few < 6 * 2**20, f"{(many - few) / 2**20:.0f} MiB more for 24 pictures than for 6"


def test_a_hairline_is_refused_on_the_28x28_and_a_huge_picture_in_one_line(trained, tmp_path, capsys):
    from PIL import Image, ImageDraw

    import predict

    hairline = Image.new("L", (500, 500), 255)
    ImageDraw.Draw(hairline).line([(30, 30), (470, 470)], fill=0, width=2)  # fades to nothing at 20 pixels
    hairline.save(tmp_path / "hairline.png")
    Image.new("1", (9500, 9500), 1).save(tmp_path / "huge.png")  # 90 megapixels: PIL's bomb warning
    code, out, err = run_main(
        predict, [trained[0] / "noteLearning_1.pth", tmp_path / "hairline.png", tmp_path / "huge.png"], capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 2 and all(line.startswith("error: ") for line in lines), err
    assert "hairline.png: no ink left at 28x28" in lines[0] and "huge.png" in lines[1] and "scale it down" in lines[1]
    assert "Warning" not in err


@settings(max_examples=40, deadline=None)
@given(
    mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16", "F", "CMYK"]),
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    fill=st.integers(0, 255),
    ink=st.one_of(st.none(), st.tuples(st.integers(0, 299), st.integers(0, 299), st.integers(1, 80))),
    form=st.sampled_from(["PNG", "TIFF", "BMP", "GIF", "JPEG", "WEBP", "truncated"]),
)
def test_any_picture_is_a_digit_or_one_line(mode, size, fill, ink, form):
    """The picture rule, on generated inputs: whatever its mode, size, ink and format (or a file cut short),
    a picture becomes a (28, 28) uint8 digit or a one-line ValueError, never another exception."""
    image = Image.new(mode, size, fill if mode not in ("RGB", "RGBA", "CMYK", "LA") else (fill,) * len(mode))
    if ink is not None:
        x, y, radius = ink
        ImageDraw.Draw(image).ellipse((x - radius, y - radius, x + radius, y + radius), fill=255 - fill)
    data = io.BytesIO()
    try:
        with warnings.catch_warnings():  # Pillow 12 warns of the writes it will refuse (mode I as PNG)
            warnings.simplefilter("ignore", DeprecationWarning)
            image.save(data, format="PNG" if form == "truncated" else form)
    except (OSError, ValueError, KeyError):
        return  # this Pillow writes no such file: nothing to read
    body = data.getvalue()[: len(data.getvalue()) // 2] if form == "truncated" else data.getvalue()
    try:
        pixels = handwriting.digit_pixels(handwriting.decode_image(io.BytesIO(body)))
    except ValueError as error:
        assert "\n" not in str(error)
        return
    assert pixels.shape == (28, 28) and pixels.dtype == torch.uint8
