"""What the command-line scripts share: flag types, shared flags, device choice, and one `main` edge
that turns errors into exit codes. Boilerplate that could serve any command-line tool.

Exit codes: 0 done, 1 a file could not be written, 2 bad input (one `error:` line), 130 Ctrl-C,
141 the reader of stdout went away (`| head`).
"""

import argparse
import contextlib
import difflib
import importlib
import importlib.util
import math
import os
import re
import signal
import sys

# The bundled data lives beside the scripts, so `python train.py` works from any folder, offline.
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")  # the repository's
# mnist_mlp.DATASETS' names, here so that the flags are parsed before torch loads (a test holds them equal).
DATASET_NAMES = ("mnist", "fashion-mnist")
MAX_WIDTH = 1 << 16  # units in one layer that --hidden or a checkpoint's config may ask for


class UsageError(Exception):
    """Bad input from the user: the scripts print `error: <message>` and exit with code 2."""


def error_text(error, limit=300):
    """An exception as one short line for an `error:` message, cut at a word if it is long."""
    text = " ".join(str(error).split()) or "no details"
    if "WeightsUnpickler error:" in text:  # torch.load's long advice; keep the part that says why
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return f"{type(error).__name__}: {text}"


# ----------------------------------------------------------------------------- flags


def _parsed(text, kind, message):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{message}, got {text!r}") from None


def bounded_int(low, high):
    """An argparse type: a whole number from low to high (inclusive)."""

    def parse(text):
        value = _parsed(text, int, "must be a whole number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def positive_float(text):
    value = _parsed(text, float, "must be a number")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    """A number from 0 up to (not including) 1: SGD's momentum."""
    value = _parsed(text, float, "must be a number")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the default of each flag that takes a value and has one (not "default: False")."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit code 2), without the usage dump,
    and shows each flag's default in --help."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        """One line; an unknown flag gets the nearest known one (--epohcs: did you mean --epochs?)."""
        if message.startswith("unrecognized arguments:"):
            unknown = [word for word in message.split(":", 1)[1].split() if word.startswith("--")]
            known = [name for name in self._option_string_actions if name.startswith("--")]
            close = difflib.get_close_matches(unknown[0].split("=")[0], known, n=1) if unknown else []
            if close:
                message += f" (did you mean {close[0]}?)"
        raise UsageError(message)


def add_device_flag(parser):
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps")


def add_data_dir_flag(parser):
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="dataset root folder")


def add_dataset_flag(parser):
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="mnist", help="dataset")


def looked_in(path):
    """Where a missing relative path was looked for (' in /the/cwd (the current folder)'); '' for an absolute one."""
    return "" if os.path.isabs(path) else f" in {os.getcwd()} (the current folder)"


def existing_file(path, what="file", flag=None):
    """`path` if it is a readable regular file; else a one-line UsageError saying what it is and, for a
    relative path, where it was looked for. Torch-free, so a mistyped name answers at once."""
    if not path.strip():
        raise UsageError(f"{flag or 'it'} needs a {what} path (it was given an empty one)")
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such file{looked_in(path)}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a {what}")
    if not os.path.isfile(path):
        raise UsageError(f"{path} is not a regular file (a pipe or a device?)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: permission denied")
    return path


def add_trust_pickle_flag(parser, what="allow pickled whole models (the tutorial's torch.save(model, ...))"):
    parser.add_argument("--trust-pickle", action="store_true", help=f"{what}: runs code from the file")


# Numbers read from text (file names, metrics.csv, HTTP headers) are ASCII only: int() also reads
# "٣" and "３" as 3, str.isdigit() is true of "²" (which int() refuses), and a regex's \d matches all
# of them; so each reader goes through these, or a pattern compiled with re.ASCII.
def whole_number(text):
    """The int `text` spells in ASCII digits 0-9 alone, or None."""
    return int(text) if isinstance(text, str) and text.isascii() and text.isdigit() else None


def decimal_number(text):
    """The float `text` spells as an ASCII decimal (digits, a point, a sign, an exponent), or None;
    never NaN or infinity."""
    if isinstance(text, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text, re.ASCII):
        value = float(text)
        return value if math.isfinite(value) else None
    return None


def require_matplotlib(what):
    """UsageError naming the install command where matplotlib, an optional dependency, is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{what} needs matplotlib, an optional dependency: pip install matplotlib")


def png_path(parser, flag, path):
    """Refuse an output picture path before any work is done: not .png, a folder, or no writable folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not path.lower().endswith(".png"):
        parser.error(f"{flag} must name a .png file")
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder; name a .png file")
    if not os.path.isdir(folder):
        parser.error(f"{flag}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        parser.error(f"{flag}: folder {folder} is not writable")


class LazyModule:
    """A module imported at its first use: a script binds its heavy imports so, and --help or a mistyped
    flag answers before torch loads (seconds). Unlike importlib's LazyLoader it is not in sys.modules
    before then, where code that looks through every module (inspect) would load it midway."""

    __slots__ = ("module_name",)

    def __init__(self, module_name):
        self.module_name = module_name

    def __getattr__(self, attribute):
        return getattr(importlib.import_module(self.module_name), attribute)


def lazy_import(*names):
    """LazyModule for each of `names`: one, or a list."""
    modules = [LazyModule(name) for name in names]
    return modules if len(modules) > 1 else modules[0]


torch = lazy_import("torch")  # at first use: the flags are parsed, and plot.py runs, without it


# ----------------------------------------------------------------------------- devices and threads


@contextlib.contextmanager
def torch_threads(count):
    """torch's CPU threads set to `count` inside the block, given back as they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(name):
    """torch.device for --device: auto is CUDA if available, else the CPU; never a silent fallback.

    MPS is used only when asked for: for this small model at batch 64, per-kernel launch costs
    make it slower than the CPU (as for small models on CUDA without CUDA graphs).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


# ----------------------------------------------------------------------------- the scripts' edge


def run_main(body, argv):
    """body(argv) -> exit code, with the errors every script shares turned into exit codes.

    argv None is no flags at all: main() in a notebook runs with the defaults (a Jupyter kernel's own
    command line, `-f kernel.json`, is not the user's); the program itself passes sys.argv[1:].
    """
    argv = [] if argv is None else [str(arg) for arg in argv]
    with printable_streams():
        try:
            code = body(argv)
            try:
                if sys.stdout is not None:  # None when the program was started with stdout closed
                    sys.stdout.flush()  # a closed pipe or a full disk shows here, inside the handlers below
            except KeyboardInterrupt:  # a late Ctrl-C: the body has reported its end already
                pass
            return code
        except UsageError as error:
            print(f"error: {printable(str(error))}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # `script ... | head`: the reader has all it wanted
            silence_stdout()
            return 141
        except OSError as error:  # stdout on a full disk (or /dev/full): say so, if stderr still can
            silence_stdout()  # so the exit's flush fails no more
            with contextlib.suppress(OSError, ValueError):
                print(f"error: cannot write the output ({error.strerror or error})", file=sys.stderr, flush=True)
            return 1


def printable(text):
    """`text` with what a terminal cannot show as itself escaped: the bytes of a file name that is not
    valid UTF-8 (surrogates), and control characters (a newline in a name must not split a line)."""
    if text.isprintable():
        return text

    def shown(character):
        if character.isprintable():
            return character
        if 0xDC80 <= ord(character) <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
            return f"\\x{ord(character) - 0xDC00:02x}"
        return character.encode("unicode_escape").decode("ascii")  # \n, \t, \u200b ...

    return "".join(map(shown, text))


@contextlib.contextmanager
def printable_streams():
    """stdout and stderr escape what their encoding cannot write (a file name's stray bytes, a Chinese
    class name in a C locale) instead of raising: output trouble is never a reason to stop. The
    streams' error handling is given back after."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", None) in ("strict", "surrogateescape"):
            changed.append((stream, stream.errors))  # surrogateescape would write a name's stray bytes raw
            stream.reconfigure(errors="backslashreplace")  # a stray byte shows as \udcff, a missing glyph as \uXXXX
    try:
        yield
    finally:
        for stream, errors in changed:
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors=errors)


def silence_stdout():
    """Point stdout at /dev/null, for output that can no longer be written (a closed pipe, a full disk)."""
    if sys.stdout is None:  # the program was started with stdout closed: nothing to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def script(main):
    """Run a script's main() as the program, its exit code the process's. Ctrl-C is KeyboardInterrupt (exit
    130 at the edge) however the process was started: one started in the background inherits SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main(sys.argv[1:])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Ctrl-C must not turn the exit into a traceback
    sys.exit(code)
