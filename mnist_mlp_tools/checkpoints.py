"""A run's saved state: written whole or not at all, read without running code from the file, and checked
against one description of what a checkpoint holds before anything is built from it.

The rules, each stated once, for any NoteModel a student writes:
- a file is read by torch.load(weights_only=True), after a size check from its zip directory;
- each entry, and each entry of its config, metrics and rng, has the type and range FIELDS gives it,
  checked by check_fields (a tensor: TENSOR); any other entry is refused;
- the weights must then fit the current NoteModel built as the config records (models.py);
- on resume, each optimizer state tensor has its parameter's shape and dtype and is finite, and the
  hyper-parameters recorded are this run's (its flags)."""

import contextlib
import io
import math
import os
import pickle
import sys
import types
import zipfile

import torch
from torch import nn

import mnist_mlp

from . import models, optimizers, safe_files
from .commands import MAX_WIDTH, UsageError, error_text, existing_file, printable


def short_text(value, limit=30):
    """`value` for a one-line message, at most `limit` characters, without recursing into it (the repr
    of a list nested thousands deep is a RecursionError), what a terminal cannot show escaped."""
    return printable(_short_text(value, limit))


def _short_text(value, limit):
    containers = (list, tuple, dict, set)
    if type(value) in (list, tuple) and len(value) <= 4 and not any(isinstance(item, containers) for item in value):
        return repr(value)[:limit]  # (0.9, 0.999)
    if isinstance(value, containers):
        text, first = f"a {type(value).__name__} of {len(value)}", next(iter(value), None)
        if value and not isinstance(first, containers):  # one level shown, never more
            text += f" starting {_short_text(first, limit)}"
        return text[:limit]
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor on {value.device.type}"
    return str(value)[:limit]


# ----------------------------------------------------------------------------- what a checkpoint holds

REAL_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def plain_tensor(value):
    """A dense CPU tensor of real numbers, all finite, storing every value it claims: a stride trick (a
    stride of 0) would make a small file a tensor of gigabytes."""
    if not (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and value.device.type == "cpu"
        and value.dtype in REAL_DTYPES
    ):
        return False
    span = 1 + value.storage_offset() + sum((size - 1) * stride for size, stride in zip(value.shape, value.stride()))
    if value.numel() and value.untyped_storage().nbytes() < max(span, value.numel()) * value.element_size():
        return False
    return not value.is_floating_point() or bool(torch.isfinite(value).all())


def whole(low, high):
    return lambda value: type(value) is int and low <= value <= high, f"a whole number from {low:,} to {high:,}"


def one_of(choices):
    return lambda value: isinstance(value, str) and value in choices, f"one of {', '.join(choices)}"


def is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


TENSOR = (
    plain_tensor,
    "a finite (no NaN or infinity) CPU tensor of real numbers storing all its values (no stride trick)",
)
NUMBER = is_number, "a finite number"
IDENTITY = (
    (
        lambda value: (
            value is None or isinstance(value, str) and 0 < len(value) <= 64 and value.isascii() and value.isalnum()
        )
    ),
    "an identity of letters and digits",
)
WIDTHS = (
    (
        lambda value: (
            isinstance(value, (list, tuple))
            and len(value) <= 64
            and all(type(width) is int and 1 <= width <= MAX_WIDTH for width in value)
        )
    ),
    f"a list of widths from 1 to {MAX_WIDTH}",
)
BETAS = lambda value: isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_number, value)), "two numbers"
FIELDS = {  # what train.py writes (training_state), entry by entry; each rule a test and what it asks for
    "model": (lambda value: isinstance(value, dict), "a dict of weights"),
    "optimizer": (lambda value: isinstance(value, dict), "an optimizer's state_dict"),
    "epoch": whole(0, 1_000_000),
    "config": {
        "hidden": WIDTHS,
        "optimizer": one_of(optimizers.OPTIMIZERS),
        "lr": NUMBER,
        "betas": BETAS,
        "eps": NUMBER,
        "weight_decay": NUMBER,
        "momentum": NUMBER,
        "inputs": one_of(mnist_mlp.INPUT_SCALINGS),
        "batch_size": whole(1, 1_000_000),
        "seed": whole(0, 2**63 - 1),
        "dataset": one_of(mnist_mlp.DATASETS),
        "val_size": whole(0, 1_000_000),
        "fused": (lambda value: type(value) is bool, "True or False"),
        "threads": whole(1, 1 << 16),
        "run": IDENTITY,
        "model_source": IDENTITY,
    },
    "metrics": {str: (lambda value: value is None or is_number(value), "a finite number")},  # str: any name
    "rng": {"data_order": TENSOR, "torch": TENSOR},
    "torch_version": (lambda value: isinstance(value, str), "a version"),
}


def check_fields(path, where, value, fields):
    """A one-line UsageError unless `value` is a dict whose every entry passes its rule in `fields`: a rule
    is (test, what it asks for), or a dict of rules checked the same way; fields[str] is any other name's."""
    if not isinstance(value, dict):
        raise UsageError(
            f"{path} is not a checkpoint written by train.py: {where} is {short_text(value)!r}, not a dict"
        )
    for key, item in value.items():
        rule = fields.get(key, fields.get(str))
        if rule is None or not isinstance(key, str):
            raise UsageError(
                f"{path} is not a checkpoint written by train.py: {where} holds an entry {short_text(key)!r}"
            )
        if isinstance(rule, dict):
            check_fields(path, f"{where}'s {key}", item, rule)
        elif not rule[0](item):
            raise UsageError(f"{path}: {where}'s {key} is {short_text(item, 40)!r}, not {rule[1]}")


# ----------------------------------------------------------------------------- saving and loading


def all_finite(tensors):
    """True if no tensor in `tensors` (any nesting of dicts and lists) holds a NaN or infinity."""
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(all_finite(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(all_finite(value) for value in tensors)
    return not isinstance(tensors, float) or math.isfinite(tensors)


def plain_copy(value):
    """`value` with every tensor replaced by a compact copy of its own (not a view of a buffer)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone(memory_format=torch.contiguous_format)
    if isinstance(value, dict):
        return type(value)((key, plain_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain_copy(item) for item in value)
    return value


class NonFiniteCheckpoint(ValueError):
    """save_checkpoint refused a checkpoint: its weights, optimizer state or figures are not finite."""


def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict atomically: a crash never leaves half a file under `path`.

    Tensors are saved as compact copies: FlatAdam's parameters and state are views of shared
    buffers, which torch.save would otherwise store whole under every view's name.
    """
    if not all_finite(checkpoint):
        raise NonFiniteCheckpoint(f"refusing to save {path}: it holds NaN or infinite values")
    buffer = io.BytesIO()  # written to memory first: a failure to write is then an OSError, and no half file
    torch.save(plain_copy(checkpoint), buffer)
    safe_files.atomic_write(path, lambda file: file.write(buffer.getbuffer()))


def training_state(model, optimizer, epoch, config, metrics, order_generator):
    """What a checkpoint of train.py holds (FIELDS): everything a resume needs to go on exactly."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "config": config,
        "metrics": metrics,
        "rng": {"data_order": order_generator.get_state(), "torch": torch.get_rng_state()},
        "torch_version": str(torch.__version__),
    }


def load_checkpoint(path, trust_pickle=False):
    """Read a checkpoint safely, onto the CPU: our dict, a bare state_dict, or (trust_pickle) a pickled model.

    Always returns our dict format, checked (checked_checkpoint) before anything is built from it; for
    a bare state_dict or a pickled model, `epoch` is 0 and the config holds only the widths.
    """
    existing_file(path, "checkpoint")
    # torch.save stores its entries uncompressed: a file that would unpack to far more is a zip bomb
    with contextlib.suppress(OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        with zipfile.ZipFile(path) as archive:
            unpacked, size = sum(entry.file_size for entry in archive.infolist()), os.path.getsize(path)
        if unpacked > 2 * size + (16 << 20):
            raise UsageError(
                f"{path} would unpack to {unpacked:,} bytes from {size:,}: not a checkpoint torch.save wrote; refused"
            )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except RecursionError:
        raise UsageError(f"{path} is not a checkpoint written by train.py: it is nested too deep to read") from None
    except Exception as error:
        try:  # what unpickling would import beyond plain data, read from the file without running it
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip that torch.save wrote
            unsafe = []
        if not unsafe:
            raise UsageError(f"{path} is not a checkpoint written by train.py ({error_text(error, 120)})") from None
        if not trust_pickle:
            if any(name.startswith(("__main__.", "torch.nn.")) for name in unsafe):
                raise UsageError(
                    f"{path} is a pickled model (torch.save(model, ...)); loading it would run "
                    f"{', '.join(unsafe[:3])} from the file: pass --trust-pickle if you trust where "
                    "it came from"
                ) from None
            raise UsageError(
                f"{path} is refused: loading it would run {unsafe[0]} (unsafe pickle); "
                "pass --trust-pickle only if you trust where it came from"
            ) from None
        print(f"warning: --trust-pickle: loading {path} runs code from the file", file=sys.stderr)
        try:
            data = _load_trusting_pickle(path)
        except Exception as trusted_error:
            raise UsageError(
                f"{path} cannot be loaded even with --trust-pickle ({error_text(trusted_error)})"
            ) from None
    return checked_checkpoint(path, data)


def _load_trusting_pickle(path):
    """torch.load(weights_only=False), which runs code from the file, for the tutorial's whole-model files.

    The tutorial pickled `__main__.NoteModel`; any class from a `__main__` we don't have is
    rebuilt as a plain nn.Module, which is all that is needed to read its weights.
    """

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            try:
                return super().find_class(module, name)
            except AttributeError:
                if module == "__main__" and not name.startswith("_"):
                    return type(name, (nn.Module,), {})
                raise

    pickle_module = types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="pickle")
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module)


def checked_checkpoint(path, data):
    """`data` from a checkpoint file as our dict (FIELDS), or a one-line UsageError naming what breaks a rule."""
    if isinstance(data, nn.Module):
        data = {name: tensor.detach() for name, tensor in data.state_dict().items()}
    if isinstance(data, dict) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
        data = {"model": data}  # a bare state_dict
    if not (isinstance(data, dict) and isinstance(data.get("model"), dict)):
        raise UsageError(
            f"{path} is not a checkpoint written by train.py: it holds no model weights "
            "(expected a checkpoint or a state_dict)"
        )
    check_fields(path, "the checkpoint", data, FIELDS)
    check_fields(path, "its weights", data["model"], {str: TENSOR})
    checkpoint = {"epoch": 0, **data, "config": dict(data.get("config", {}))}
    config = checkpoint["config"]
    if config.get("val_size") and "seed" not in config:
        raise UsageError(f"{path}: it held out {config['val_size']} validation images but records no seed")
    if "hidden" not in config:
        config["hidden"] = models.args_from_weights(checkpoint["model"])
        if config["hidden"] is None:
            raise UsageError(f"{path} records no widths, and {models.signature_text()} in mnist_mlp.py needs them")
    config["hidden"] = list(config["hidden"])
    return checkpoint


def input_scaling(checkpoint):
    """How a checked checkpoint's model reads pixels (mnist_mlp.INPUT_SCALINGS): what it was trained on."""
    return checkpoint["config"].get("inputs", "tutorial")


def dataset_classes(checkpoint):
    """The class names of the dataset a checked checkpoint was trained on."""
    return mnist_mlp.DATASETS[checkpoint["config"].get("dataset", "mnist")][1]


# ----------------------------------------------------------------------------- resuming

FLAGS = {
    "hidden": "--hidden",
    "optimizer": "--optimizer",
    "lr": "--lr",
    "momentum": "--momentum",
    "weight_decay": "--weight-decay",
    "inputs": "--inputs",
    "batch_size": "--batch-size",
    "seed": "--seed",
    "dataset": "--dataset",
    "val_size": "--val-size",
    "fused": "--fused",
    "threads": "--threads",
}


def resume_widths(path, saved, hidden):
    """The widths to build NoteModel with to resume a checkpoint: --hidden where given (it must be the
    checkpoint's), else the checkpoint's as the current NoteModel takes them (its weights must then fit)."""
    if hidden is None:
        return models.args_for_current(saved["hidden"])
    if list(hidden) != list(saved["hidden"]):
        raise UsageError(
            f"{path} has widths {list(saved['hidden'])}, but --hidden is {' '.join(map(str, hidden))}; "
            f"pass --hidden {' '.join(map(str, saved['hidden']))}, or leave --hidden out to take the "
            "checkpoint's"
        )
    return models.constructor_args(hidden)


def check_resume_config(path, saved, current):
    """Refuse to resume a run with other settings than the checkpoint's (the model is the weights' to fit)."""
    if "optimizer" not in saved:
        return  # a bare state_dict or a tutorial file: weights only
    differences = [
        f"{FLAGS.get(key, key)}: checkpoint {saved[key]!r}, now {value!r}"  # not the run, nor the code:
        for key, value in current.items()  # models.py warns of that
        if key in saved and key not in ("run", "model_source", "hidden") and saved[key] != value
    ]
    if differences:
        raise UsageError(
            f"{path} was trained with other settings ({'; '.join(differences)}); "
            "pass the same flags to resume it exactly"
        )


def restore_training_state(path, resumed, config, optimizer, order_generator):
    """Load a checkpoint's optimizer and generator states; returns the epoch to go on from."""
    check_resume_config(path, resumed["config"], config)
    if "optimizer" not in resumed:
        return 0  # weights only: a fresh optimizer, epoch numbers from 1
    check_optimizer_state(path, resumed["optimizer"], optimizer, config)
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except Exception as error:  # a malformed entry: torch raises several kinds
        raise UsageError(f"{path}: its optimizer state does not fit ({error_text(error)})") from None
    rng = resumed.get("rng")
    if rng is None:
        print(
            f"warning: {path} records no random-generator state: the batch order from here on will "
            "differ from an uninterrupted run's",
            file=sys.stderr,
        )
    else:
        try:
            order_generator.set_state(rng["data_order"])
            torch.set_rng_state(rng["torch"])
        except Exception as error:
            raise UsageError(f"{path}: its rng entry is malformed ({error_text(error)})") from None
    return resumed["epoch"]


def same(value, expected):
    """value == expected for the plain values a param group holds (numbers, bools, strings, None, lists and
    tuples of them), never calling a tensor's == nor recursing deeper than `expected` goes."""
    if type(expected) in (list, tuple):
        return type(value) in (list, tuple) and len(value) == len(expected) and all(map(same, value, expected))
    return (
        type(value) in (int, float, bool, str, type(None))
        and value == expected
        and (type(value) is bool) == (type(expected) is bool)
    )


def check_optimizer_state(path, saved, optimizer, config):
    """Refuse an optimizer state that does not fit this run, before torch builds anything from it: one param
    group of this optimizer's entries, each equal to this run's (only how torch runs it, foreach and fused,
    may differ), and per parameter the state this optimizer keeps, each tensor of the parameter's shape and
    dtype and finite, and one step count for all."""

    def refuse(what):
        raise UsageError(f"{path}: its optimizer state {what}; resume from another checkpoint")

    parameters, ours = optimizer.param_groups[0]["params"], optimizer.param_groups[0]
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("state"), dict)
        and type(saved.get("param_groups")) is list
        and len(saved["param_groups"]) == 1
        and isinstance(saved["param_groups"][0], dict)
    ):
        refuse("is not one param group and a state dict, as the optimizer saves them")
    group = saved["param_groups"][0]
    if not same(group.get("params"), list(range(len(parameters)))):
        refuse(f"names parameters {short_text(group.get('params'), 60)}, not the model's {len(parameters)}")
    for key, value in group.items():
        if key in ("foreach", "fused"):
            if type(value) not in (bool, type(None)):
                refuse(f"has {key} {short_text(value)}, not True, False or None")
        elif key not in ours:
            refuse(f"has a param group entry {short_text(key)!r} that {config.get('optimizer', 'adam')} does not make")
        elif key != "params" and not same(value, ours[key]):  # same() takes a list for a tuple
            flag = f"({FLAGS[key]})" if key in FLAGS else "(train.py always uses the default)"
            refuse(f"says {key} {short_text(value)}, but this run's is {ours[key]!r} {flag}")
    kind = optimizers.OPTIMIZERS[config.get("optimizer", "adam")]
    names = set(kind.state_tensors) | ({"step"} if kind.counts_steps else set())
    steps = set()
    for index, state in saved["state"].items():
        if type(index) is not int or not 0 <= index < len(parameters):
            refuse(f"has an entry {short_text(index, 20)} that is no parameter of the model")
        if not (isinstance(state, dict) and set(state) == names):
            refuse(f"for parameter {index} holds {short_text(state)}, not {sorted(names)}")
        parameter = parameters[index]
        for name in kind.state_tensors:
            tensor = state[name]
            if not (
                tensor is None
                and name == "momentum_buffer"
                or plain_tensor(tensor)  # None: SGD before a step
                and tensor.shape == parameter.shape
                and tensor.dtype == parameter.dtype
            ):
                refuse(
                    f"{name} of parameter {index} is {short_text(tensor)}, not a finite {parameter.dtype} tensor "
                    f"of shape {list(parameter.shape)}"
                )
        if kind.counts_steps:
            step = state["step"]
            if isinstance(step, torch.Tensor):
                step = float(step) if plain_tensor(step) and step.numel() == 1 else None
            if not (is_number(step) and 0 <= step <= 1e9 and step == int(step)):
                refuse(f"step count of parameter {index} is {short_text(state['step'])}, not a whole number")
            steps.add(step)
    if len(steps) > 1:
        refuse(f"has different step counts per parameter ({sorted(steps)[:3]}): not one that train.py saved")
