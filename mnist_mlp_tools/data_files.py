"""The dataset's files on disk: the bundled .gz copies decompressed once (torchvision's reader, the
tutorial's, needs them so), missing files downloaded, and the lesson's load_dataset, whose read_idx checks
every file, with its errors as one-line UsageErrors."""

import errno
import os
import struct
import zlib

import mnist_mlp

from . import commands, safe_files
from .commands import UsageError, error_text
from .safe_files import is_regular_file

torchvision = commands.lazy_import("torchvision")  # at first use: only a download needs it


def raw_folder(data_dir, dataset):
    return os.path.join(data_dir, mnist_mlp.DATASETS[dataset][0], "raw")


def load(data_dir, dataset="mnist", download=True):
    """(train Split, test Split): the files decompressed, downloaded where missing, and read."""
    folder = raw_folder(data_dir, dataset)
    if os.path.exists(data_dir) and not (os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK)):
        raise UsageError(f"cannot read the data folder {data_dir}: not a readable folder")
    present = [name for name in mnist_mlp.RAW_FILES if any(map(os.path.lexists, raw_paths(folder, name)))]
    if len(present) < len(mnist_mlp.RAW_FILES):
        if not download:
            raise UsageError(missing_data_message(folder, dataset))
        download_raw_files(data_dir, dataset)
    for name in mnist_mlp.RAW_FILES:
        decompress(folder, name)
    try:
        return mnist_mlp.load_dataset(data_dir, dataset)
    except (ValueError, OSError) as error:
        raise UsageError(str(error) if isinstance(error, ValueError) else error_text(error)) from None


def raw_paths(folder, name):
    return os.path.join(folder, name), os.path.join(folder, name + ".gz")


def decompress(folder, name):
    """folder/name from folder/name.gz where only that is there: read and checked by the lesson's read_idx,
    then written whole. In a folder that cannot be written (a read-only install) the .gz is left as it is,
    and the lesson reads it directly. A file that is not a regular one (a FIFO) is refused, not waited on."""
    path, packed = raw_paths(folder, name)
    for existing in (path, packed):
        if os.path.lexists(existing) and not is_regular_file(existing):
            raise UsageError(f"{existing} is not a regular file")
    if os.path.lexists(path):
        return
    ndim = 3 if "images" in name else 1
    try:
        pixels = mnist_mlp.read_idx(packed, ndim)
    except (ValueError, OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise UsageError(f"cannot decompress {packed} ({error_text(error)})") from None
    header = struct.pack(f">{1 + ndim}I", 0x800 + ndim, *pixels.shape)
    try:
        safe_files.atomic_write(path, lambda file: file.write(header + pixels.numpy().tobytes()))
    except OSError as error:
        if error.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):  # read-only: the lesson reads the .gz
            raise UsageError(f"cannot decompress {packed} ({error_text(error)})") from None


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


def download_raw_files(data_dir, dataset):
    """Ask torchvision to download the four raw files into data_dir/<Dataset>/raw/."""
    folder = raw_folder(data_dir, dataset)
    try:
        with safe_files.folders_removed_if_left_empty(folder):  # a failed download leaves no empty folders
            getattr(torchvision.datasets, mnist_mlp.DATASETS[dataset][0])(data_dir, train=True, download=True)
    except Exception as error:  # torchvision raises many kinds: offline, corrupt, permissions
        raise UsageError(f"{missing_data_message(folder, dataset)} (download failed: {error_text(error)})") from None
    missing = [name for name in mnist_mlp.RAW_FILES if not any(map(os.path.lexists, raw_paths(folder, name)))]
    if missing:
        raise UsageError(f"{missing_data_message(folder, dataset)} (the download left out {', '.join(missing)})")


def missing_data_message(folder, dataset):
    return (
        f"{dataset} data not found: put {', '.join(mnist_mlp.RAW_FILES)} (or their .gz) into {folder}, "
        "or point --data-dir at a folder that has them"
    )
