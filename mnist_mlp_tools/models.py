"""NoteModel as the student wrote it, for every command: built with the widths its __init__ takes (or
none), refused in one line where it does not fit the data or the machine, told apart by its source, and
compared with a checkpoint's weights by name, shape and dtype. Nothing here assumes 784-128-64-10:
the images (28x28) and the class count come from the dataset."""

import functools
import hashlib
import inspect
import os
import sys

import torch

import mnist_mlp

from .commands import MAX_WIDTH, UsageError, error_text


def width_parameters():
    """(names, defaults) of the widths NoteModel's __init__ takes: its leading positional parameters
    whose defaults are whole numbers (or that have none); names is None where it takes *args."""
    parameters = list(inspect.signature(mnist_mlp.NoteModel).parameters.values())
    if any(parameter.kind == parameter.VAR_POSITIONAL for parameter in parameters):
        return None, []
    names, defaults = [], []
    for parameter in parameters:
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD) or not (
            parameter.default is parameter.empty or type(parameter.default) is int
        ):
            break
        names.append(parameter.name)
        defaults.append(parameter.default)
    return names, defaults


def signature_text():
    names, _ = width_parameters()
    return f"NoteModel({'*args' if names is None else ', '.join(names)})"


def constructor_args(hidden):
    """The widths train.py passes to NoteModel: --hidden where given (and taken), else its own defaults.

    A NoteModel that takes no widths is built with none, and --hidden given to it is an error: the
    widths are then written in NoteModel itself.
    """
    names, defaults = width_parameters()
    if hidden is None:
        if names is not None and inspect.Parameter.empty in defaults:
            raise UsageError(
                f"{signature_text()} in mnist_mlp.py has widths without defaults: pass them as "
                f"--hidden {' '.join(name.upper() for name in names)}"
            )
        return list(defaults) if names is not None else []
    if names is not None and len(hidden) != len(names):
        if not names:
            raise UsageError(
                "NoteModel in mnist_mlp.py takes no widths (its __init__ has no width parameters): "
                "leave out --hidden, or change the widths in NoteModel itself"
            )
        raise UsageError(
            f"--hidden got {len(hidden)} width{'s' * (len(hidden) != 1)} ({' '.join(map(str, hidden))}), "
            f"but {signature_text()} in mnist_mlp.py takes {len(names)}; another depth is an edit "
            "of NoteModel (docs/editing-the-model.md)"
        )
    return list(hidden)


def build(args, device=None):
    """NoteModel(*args), on `device` if given ("meta" allocates nothing); its own errors are
    one line, since a student's __init__ is the likeliest place for a mistake."""
    try:
        if device is None:
            return mnist_mlp.NoteModel(*args)
        with torch.device(device):
            return mnist_mlp.NoteModel(*args)
    except Exception as error:
        built = f"NoteModel({', '.join(map(str, args))})"
        raise UsageError(f"{built} in mnist_mlp.py failed: {error_text(error)}") from None


def machine_memory():
    """Bytes of memory of this machine, or None where the system does not say (os.sysconf is POSIX-only)."""
    if not hasattr(os, "sysconf"):
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def fit_in_memory(args):
    """args, after checking on the meta device (nothing allocated) that training NoteModel(*args) fits in
    memory: its parameters and buffers, their gradients, Adam's m and v and a checkpoint's two copies."""
    try:
        model = build(args, "meta")
    except UsageError:
        return args  # a constructor that does not run on the meta device is built for real, and checked there
    size = sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *model.buffers()])
    memory = machine_memory()
    if memory is not None and size * 6 > memory:
        raise UsageError(
            f"{signature_text()} with {' '.join(map(str, args)) or 'its defaults'} makes "
            f"{size // 4:,} parameters, about {size * 6 / 2**30:.0f} GiB to train, more than this "
            f"machine's {memory / 2**30:.0f} GiB; choose smaller widths"
        )
    return args


@torch.no_grad()
def check_output(model, classes):
    """Refuse a model whose forward() does not turn a batch of (N, 1, 28, 28) images into (N, classes).

    Run in eval mode on two blank images, leaving the model's mode and the random generators as they were.
    """
    parameter = next(iter(model.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            output = model(mnist_mlp.normalize(torch.zeros(2, 784, dtype=torch.uint8, device=device)))
    except Exception as error:
        raise UsageError(
            f"NoteModel's forward() in mnist_mlp.py fails on a batch of images (N, 1, 28, 28): {error_text(error)}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != (2, len(classes)):
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise UsageError(
            f"NoteModel's forward() in mnist_mlp.py gives {shape} for 2 images; it must give "
            f"[2, {len(classes)}], one score per class of the dataset"
        )


def source_fingerprint():
    """A short hash of NoteModel's source, recorded with its checkpoints; None where the source cannot be
    read (a class typed into a notebook)."""
    return _class_fingerprint(mnist_mlp.NoteModel)


@functools.lru_cache(maxsize=16)
def _class_fingerprint(cls):
    # once per class: inspect.getsource parses the class's whole file (an edited file is a new class
    # only once reloaded, and the class that runs is the one read first)
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return None
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def args_from_weights(state):
    """The widths to build NoteModel with for weights that record none (a bare state_dict, the tutorial's
    file): for a NoteModel taking k widths, the outputs of fc1..fck where those layers are there."""
    names, defaults = width_parameters()
    widths = []
    for number in range(1, len(names or []) + 1):
        weight = state.get(f"fc{number}.weight")
        if not (isinstance(weight, torch.Tensor) and weight.dim() == 2 and 1 <= weight.shape[0] <= MAX_WIDTH):
            return None if inspect.Parameter.empty in defaults else constructor_args(None)
        widths.append(int(weight.shape[0]))
    return widths


def args_for_current(recorded):
    """A checkpoint's recorded widths as the current NoteModel takes them: all, the first few, or none."""
    names, _ = width_parameters()
    return list(recorded) if names is None else list(recorded)[: len(names)]


def _listed(names, limit=4):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def mismatch(state, model):
    """Why the weights `state` do not fit `model` (every missing, unexpected and mis-shaped name, the
    first few of each, and which side is which), or None if each name has the model's shape and dtype."""
    expected = model.state_dict()
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    reshaped = [
        f"{name} is {list(state[name].shape)} there, {list(tensor.shape)} in NoteModel"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    retyped = [
        f"{name} is {state[name].dtype} there, {tensor.dtype} in NoteModel"
        for name, tensor in expected.items()
        if name in state and state[name].shape == tensor.shape and state[name].dtype != tensor.dtype
    ]
    parts = (
        ([f"NoteModel has {_listed(missing)} that the checkpoint lacks"] if missing else [])
        + ([f"the checkpoint has {_listed(unexpected)} that NoteModel lacks"] if unexpected else [])
        + ([_listed(reshaped, 3)] if reshaped else [])
        + ([_listed(retyped, 3)] if retyped else [])
    )
    return "; ".join(parts) or None


def check_fit(path, checkpoint, model):
    """A one-line error if a checked checkpoint's weights do not fit `model`, naming what differs; returns
    whether they were trained by another version of NoteModel (its recorded source differs)."""
    recorded, current = checkpoint["config"].get("model_source"), source_fingerprint()
    changed = recorded is not None and current is not None and recorded != current
    problem = mismatch(checkpoint["model"], model)
    if problem:
        version = "another version of NoteModel" if changed else "another NoteModel"
        raise UsageError(
            f"{path} does not fit NoteModel in mnist_mlp.py: {problem} (it was trained by {version}: "
            "restore that NoteModel, or train this one)"
        )
    return changed


def load_weights(path, checkpoint, model):
    """Put a checked checkpoint's weights into `model` (the current NoteModel), strictly; weights that fit
    but were trained by another version of NoteModel get a warning line."""
    if check_fit(path, checkpoint, model):
        print(
            f"warning: {path} was trained by another version of NoteModel (mnist_mlp.py has changed since); "
            "its weights fit, so it is read with today's forward()",
            file=sys.stderr,
        )
    model.load_state_dict(checkpoint["model"])
    return model


def model_from_checkpoint(path, checkpoint, device="cpu"):
    """The current NoteModel built as a checked checkpoint records (its widths), with its weights, on `device`.

    Compared on the meta device first, so a misfit allocates nothing and the sizes built are the
    file's own tensors' (bounded by the file).
    """
    args = args_for_current(checkpoint["config"]["hidden"])
    try:
        skeleton = build(args, "meta")
    except UsageError:  # a constructor that does not run on the meta device: build() below says why, if it fails
        skeleton = None
    if skeleton is not None:
        check_fit(path, checkpoint, skeleton)
    model = load_weights(path, checkpoint, build(args))
    check_output(model, mnist_mlp.DATASETS[checkpoint["config"].get("dataset", "mnist")][1])
    return model.to(device)
