"""Your own handwriting, prepared as MNIST's digits were: light ink on black, the ink's longer side
scaled to 20 pixels and its centre of mass placed at the centre of 28x28; then read by the model.
The one path from a picture to the model's answer, for predict.py and draw.py."""

import threading
import warnings

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

import mnist_mlp

from .commands import error_text

MAX_PIXELS = 40_000_000  # a 40-megapixel photo is larger than any phone's; more is refused, not decoded
# EXIF orientation -> the turn that shows the picture upright (ImageOps.exif_transpose's table)
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
WORKING_SIDE = 600  # a picture is prepared at most this wide: a stroke is still several pixels there
_OPENING = threading.Lock()  # the warnings filter is the process's: one decode at a time changes it


def decode_image(source, max_pixels=None):
    """The PIL image in `source` (a path or a binary file), decoded; a one-line ValueError for anything
    that is not a usable image, whichever decoder fails and however. At most max_pixels (MAX_PIXELS).

    The size is read from the header and checked before anything is decoded; PIL's own warning about a
    huge image becomes this error line. A JPEG is decoded at the smallest scale (1/2 to 1/8) that keeps
    it at least WORKING_SIDE wide, which bounds its memory before a pixel of it exists.
    """
    max_pixels = max_pixels or MAX_PIXELS
    # The warnings filter is the process's: opening and decoding hold a lock while it is changed. PIL's
    # warnings about a file (a huge one, corrupt EXIF) are this picture's error or nothing, not lines
    # of PIL's own on stderr.
    with _OPENING, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return _decode(source, max_pixels)


def _decode(source, max_pixels):
    try:
        image = Image.open(source)  # reads the header only
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ValueError(f"it is larger than the {max_pixels:,} pixels this reads; scale it down first") from None
    except Exception as error:  # any decoder's failure on a header: this picture's error, not the program's
        raise ValueError(f"cannot read it ({error_text(error)})") from None
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise ValueError(
                f"{width}x{height} is {width * height:,} pixels, more than the {max_pixels:,} "
                "this reads; scale it down first"
            )
        if image.format == "JPEG":
            image.draft(image.mode, (WORKING_SIDE, WORKING_SIDE))
        image.load()  # a single-frame file is closed by PIL once loaded
        return image
    except ValueError:
        image.close()
        raise
    except Exception as error:  # PIL's decoders raise OSError, SyntaxError, struct.error, ZeroDivisionError...
        image.close()
        raise ValueError(f"cannot read it ({error_text(error)})") from None


@torch.no_grad()
def class_probabilities(model, pixels, scaling="tutorial"):
    """The model's probability for each class (classes,) of one prepared (28, 28) uint8 digit, its pixels
    scaled as the model was trained (mnist_mlp.INPUT_SCALINGS)."""
    device = next(model.parameters()).device
    return torch.softmax(model(mnist_mlp.normalize(pixels.view(1, 784).to(device), scaling)), dim=1)[0].cpu()


def digit_pixels(image):
    """A PIL image of one handwritten digit, prepared as MNIST's digits were: (28, 28) uint8.

    MNIST digits are light ink on black, scaled so the longer side of the ink is 20 pixels
    (aspect ratio kept), and placed in the 28x28 frame so the ink's centre of mass is at the
    centre. A photo or drawing is usually dark ink on light paper, of any size, off centre:
    this inverts it if its border is light, lifts the paper to black (transparent counts as
    paper), crops the ink with a margin that ignores specks and shadows, scales and centres it.
    A 28x28 image that is already light on dark passes through unchanged. ValueError if the
    image holds no ink, or PIL cannot convert it (an odd mode): that picture's error, never the program's.
    """
    try:
        return _digit_pixels(image)
    except ValueError:
        raise
    except Exception as error:  # PIL's conversions raise other kinds on odd modes
        raise ValueError(f"cannot read it ({error_text(error)})") from None


def _digit_pixels(image):
    orientation = image.getexif().get(0x0112, 1)  # phone photos store their rotation apart (EXIF)
    image = _reduced(image)  # first: turning a huge picture would copy it whole
    if orientation in ORIENTATIONS:
        image = image.transpose(ORIENTATIONS[orientation])
    gray = _grayscale(image)
    if gray.shape == (28, 28) and _border(gray).median() < 0.25:  # already MNIST-style
        if float(gray.max()) < 0.3:
            raise ValueError("no ink found: a blank image?")
        return (
            (gray * 255).round().to(torch.uint8)
            if image.mode != "L"
            else torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(28, 28)
        )
    if max(gray.shape) > WORKING_SIDE:  # a photo: work at a size where a stroke is still several pixels wide
        scale = WORKING_SIDE / max(gray.shape)
        gray = _resize(gray, max(1, round(gray.shape[0] * scale)), max(1, round(gray.shape[1] * scale)))
    ink = gray if _border(gray).median() < 0.5 else 1 - gray
    paper = ink.median()  # most of a picture is paper, so its median is the paper's shade
    ink = ((ink - paper) / (1 - paper).clamp(min=1e-6)).clamp(0, 1)
    ink = torch.where(ink < 0.2, torch.zeros_like(ink), ink)  # paper grain, faint shadows
    if float(ink.max()) < 0.3:
        raise ValueError("no ink found: a blank image?")
    top, bottom, left, right = _ink_box(ink)
    crop = ink[top:bottom, left:right]
    height, width = crop.shape
    scale = 20 / max(height, width)
    crop = _resize(crop, max(1, round(height * scale)), max(1, round(width * scale))).clamp(0, 1)
    digit = (_centre_by_mass(crop) * 255).round().to(torch.uint8)
    if int(digit.max()) < 0.3 * 255:  # checked on what the model sees: a hairline fades away when shrunk
        raise ValueError("no ink left at 28x28: the strokes are too thin for the picture's size; draw them thicker")
    return digit


def _reduced(image):
    """A picture more than twice WORKING_SIDE wide, shrunk by a whole factor in its own mode (a box
    average) before it is converted to floats: four bytes a pixel of a huge picture are never made."""
    factor = max(image.size) // WORKING_SIDE
    if factor < 2:
        return image
    if image.mode in ("1", "P"):  # modes reduce() does not take: to bytes first
        image = image.convert("RGBA" if "transparency" in image.info else "L")
    try:
        return image.reduce(factor)
    except ValueError:  # a mode reduce() does not take: prepared at full size
        return image


def _grayscale(image):
    """The image as a float tensor (H, W) in [0, 1]; transparent pixels become white paper."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit, 32-bit and float images
        values = _from_pil(image.convert("F"))
        if not bool(values.isfinite().all()):
            raise ValueError("the image holds NaN or infinite pixel values")
        # scaled by their range: floats in [0, 1] as they are, bytes' range by 255, 16 bits' by 65535
        top = float(values.max())
        scale = 1.0 if image.mode == "F" and top <= 1.0 else 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        return (values / scale).clamp(0, 1)
    if "A" in image.mode or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return _from_pil(image.convert("L").convert("F")) / 255.0


def _from_pil(image):
    """A PIL "F" image as a float32 tensor (H, W)."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32).view(image.height, image.width)


def _resize(values, height, width):
    """Resize a float tensor (H, W) with PIL's Lanczos filter, which averages over the pixels it shrinks."""
    image = Image.frombytes("F", (values.shape[1], values.shape[0]), values.float().contiguous().numpy().tobytes())
    return _from_pil(image.resize((width, height), Image.Resampling.LANCZOS))


def _border(values):
    """The pixels of the outer 5% frame of a (H, W) tensor."""
    height, width = values.shape
    band = max(1, round(0.05 * min(height, width)))
    return torch.cat(
        [values[:band].flatten(), values[-band:].flatten(), values[:, :band].flatten(), values[:, -band:].flatten()]
    )


def _ink_box(ink):
    """(top, bottom, left, right) around the ink, leaving out specks: isolated pixels are dropped
    (3x3 median) and the outermost 0.2% of the ink on each side is ignored."""
    strong = (ink > 0).float()
    if min(ink.shape) >= 56:  # big enough that a stroke is wider than a speck
        windows = F.pad(strong[None, None], (1, 1, 1, 1)).unfold(2, 3, 1).unfold(3, 3, 1)
        filtered = (windows.reshape(*ink.shape, 9).sum(-1) >= 5).float()
        strong = filtered if filtered.sum() > 0 else strong
    box = []
    for profile in (strong.sum(1), strong.sum(0)):
        cumulative = profile.cumsum(0) / profile.sum()
        first = int((cumulative > 0.002).nonzero()[0])
        end = int((cumulative >= 0.998).nonzero()[0]) + 1
        box += [first, end]
    return box


def _centre_by_mass(digit):
    """Place a (h, w) digit, h and w at most 20, in a 28x28 frame with its centre of mass at pixel
    (14, 14), where MNIST's test digits have theirs on average (measured: 13.99, 14.00)."""
    height, width = digit.shape
    total = digit.sum().clamp(min=1e-6)
    row_mass = float((digit.sum(1) * torch.arange(height)).sum() / total)
    column_mass = float((digit.sum(0) * torch.arange(width)).sum() / total)
    top = min(max(round(14 - row_mass), 0), 28 - height)
    left = min(max(round(14 - column_mass), 0), 28 - width)
    frame = torch.zeros(28, 28)
    frame[top : top + height, left : left + width] = digit
    return frame
