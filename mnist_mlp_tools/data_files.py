"""The dataset's files on disk: the bundled .gz copies decompressed once and checked, missing files
downloaded, and the lesson's load_dataset with its errors as one-line UsageErrors."""

import errno
import gzip
import math
import os
import struct
import zlib

import mnist_mlp

from . import commands, safe_files
from .commands import UsageError, error_text
from .safe_files import is_regular_file

torchvision = commands.lazy_import("torchvision")  # at first use: only a download needs it

MAX_IMAGES = 1_000_000  # MNIST has 70,000; a header claiming more than this is refused


def raw_folder(data_dir, dataset):
    return os.path.join(data_dir, mnist_mlp.DATASETS[dataset][0], "raw")


def load(data_dir, dataset="mnist", download=True):
    """(train Split, test Split): the files prepared (decompressed, checked, downloaded) and read."""
    folder = raw_folder(data_dir, dataset)
    if os.path.exists(data_dir) and not (os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK)):
        raise UsageError(f"cannot read the data folder {data_dir}: not a readable folder")
    missing = [name for name in mnist_mlp.RAW_FILES if not prepare_raw_file(folder, name)]
    if missing and not download:
        raise UsageError(missing_data_message(folder, dataset))
    if missing:
        download_raw_files(data_dir, dataset)
    try:
        return mnist_mlp.load_dataset(data_dir, dataset)
    except (ValueError, OSError) as error:
        raise UsageError(str(error) if isinstance(error, ValueError) else error_text(error)) from None


def require_decompressed(data_dir, dataset="mnist"):
    """A UsageError unless the raw files are there decompressed, as torchvision's reader needs them
    (load reads the .gz directly where the folder cannot be written)."""
    folder = raw_folder(data_dir, dataset)
    if not all(os.path.exists(os.path.join(folder, name)) for name in mnist_mlp.RAW_FILES):
        raise UsageError(
            f"torchvision reads the data decompressed, and {folder} cannot be written: copy the data "
            f"folder somewhere writable and pass it as --data-dir (cp -r {data_dir} mnist-data; "
            "--data-dir mnist-data)"
        )


def split_validation(train, val_size, seed):
    """mnist_mlp.split_validation, a --val-size that does not fit as a one-line UsageError."""
    try:
        return mnist_mlp.split_validation(train, val_size, seed)
    except ValueError as error:
        raise UsageError(str(error)) from None


def prepare_raw_file(folder, name):
    """True once folder/name is a valid IDX file, gunzipping folder/name.gz if needed; False if absent.
    In a folder that cannot be written (a read-only install) the .gz is left as it is: the lesson's
    load_dataset reads it directly, and checks it.

    Decompressed once, so later runs read the bytes straight (torchvision's reader, which the
    tutorial uses, needs them so too): to a temp file, checked, then renamed. A broken decompressed
    file is replaced from its .gz, so a fixed .gz heals it.
    """
    path, packed = os.path.join(folder, name), os.path.join(folder, name + ".gz")
    ndim = 3 if "images" in name else 1
    if os.path.lexists(path):
        try:
            check_idx_file(path, ndim)
            return True
        except UsageError:
            if not is_regular_file(packed):
                raise
    if not is_regular_file(packed):
        if os.path.lexists(packed):
            raise UsageError(f"{packed} is not a regular file")
        return False

    def gunzip(file):
        with gzip.open(packed, "rb") as compressed:
            header = compressed.read(4 + 4 * ndim)
            size = check_idx_header(header, None, ndim, packed)
            file.write(header)
            left = size - len(header)
            while left > 0:  # no more than the header promises: a small .gz cannot fill the disk
                chunk = compressed.read(min(left, 1 << 20))
                if not chunk:
                    break
                file.write(chunk)
                left -= len(chunk)
            if left or compressed.read(1):
                raise UsageError(f"{packed} does not hold the {size:,} bytes its header promises: truncated or corrupt")

    try:
        safe_files.atomic_write(path, gunzip)  # its temp file is made first: a read-only folder fails at once
    except OSError as error:
        if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # a read-only install: the lesson reads the .gz
            return True
        raise UsageError(f"cannot decompress {packed} ({error_text(error)})") from None
    except (EOFError, zlib.error) as error:  # a corrupt .gz (BadGzipFile is an OSError: above)
        raise UsageError(f"cannot decompress {packed} ({error_text(error)})") from None
    return True


def check_idx_file(path, ndim):
    """Refuse a file that is not a complete IDX file of unsigned bytes with `ndim` dimensions."""
    if not is_regular_file(path):
        raise UsageError(f"{path} is not a regular file")
    try:
        with open(path, "rb") as file:
            header = file.read(4 + 4 * ndim)
    except OSError as error:
        raise UsageError(f"cannot read {path} ({error.strerror})") from None
    check_idx_header(header, os.path.getsize(path), ndim, path)


def check_idx_header(header, size, ndim, shown_name):
    """The file size an IDX header promises, checked against `size` (when known)."""
    if len(header) < 4 + 4 * ndim:
        raise UsageError(f"{shown_name} is truncated: not an IDX file")
    magic, *dims = struct.unpack(f">{1 + ndim}I", header)
    if magic != 0x800 + ndim:
        raise UsageError(
            f"{shown_name} is not an IDX file of {ndim}-D bytes (magic {magic:#010x}, expected {0x800 + ndim:#010x})"
        )
    if ndim == 3 and tuple(dims[1:]) != (28, 28):
        raise UsageError(f"{shown_name} holds images of {dims[1]}x{dims[2]} pixels, not 28x28")
    if dims[0] > MAX_IMAGES:  # checked before a byte is decompressed: a small .gz cannot fill the disk
        raise UsageError(f"{shown_name} claims {dims[0]:,} items, more than the {MAX_IMAGES:,} this reads")
    expected_size = len(header) + math.prod(dims)
    if size is not None and size != expected_size:
        raise UsageError(f"{shown_name} has {size} bytes, its header promises {expected_size}: truncated or corrupt")
    return expected_size


def download_raw_files(data_dir, dataset):
    """Ask torchvision to download the four raw files into data_dir/<Dataset>/raw/."""
    folder = raw_folder(data_dir, dataset)
    try:
        with safe_files.folders_removed_if_left_empty(folder):  # a failed download leaves no empty folders
            getattr(torchvision.datasets, mnist_mlp.DATASETS[dataset][0])(data_dir, train=True, download=True)
    except Exception as error:  # torchvision raises many kinds: offline, corrupt, permissions
        raise UsageError(f"{missing_data_message(folder, dataset)} (download failed: {error_text(error)})") from None
    missing = [name for name in mnist_mlp.RAW_FILES if not prepare_raw_file(folder, name)]
    if missing:
        raise UsageError(f"{missing_data_message(folder, dataset)} (the download left out {', '.join(missing)})")


def missing_data_message(folder, dataset):
    return (
        f"{dataset} data not found: put {', '.join(mnist_mlp.RAW_FILES)} (or their .gz) into {folder}, "
        "or point --data-dir at a folder that has them"
    )
