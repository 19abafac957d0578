"""Checkpoints: saved whole or not at all, loaded without running code from the file, and checked
before anything is built from them; and what a resumed run must match to continue exactly.

The rules, stated once and for any NoteModel a student writes: a checkpoint's weights are a dict of
names to dense, strided CPU tensors of a plain dtype (FLOAT_DTYPES, or INTEGER_DTYPES for counters
such as BatchNorm's), each storing all the values it claims, all finite; its config fields have
their types and ranges; the weights must then have exactly the names, shapes and dtypes of the
current NoteModel built as the config records (models.py)."""

import io
import math
import os
import pickle
import pickletools
import sys
import types
import zipfile

import torch
from torch import nn

import mnist_mlp
from . import models, optimizers, safe_files
from .commands import MAX_WIDTH, UsageError, existing_file, reason

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def brief(value, limit=30):
    """`value` for a one-line message, at most `limit` characters, without recursing into it: the repr
    of a list nested thousands deep is a RecursionError."""
    containers = (list, tuple, dict, set)
    if isinstance(value, containers):
        text, first = f"a {type(value).__name__} of {len(value)}", next(iter(value), None)
        if value and not isinstance(first, containers):  # one level shown, never more
            text += f" starting {brief(first, limit)}"
        return text[:limit]
    if isinstance(value, torch.Tensor):
        return f"a {tuple(value.shape)} {value.dtype} tensor"[:limit]
    return str(value)[:limit]


def all_finite(tensors):
    """True if no tensor in `tensors` (any nesting of dicts and lists) holds a NaN or infinity."""
    if isinstance(tensors, torch.Tensor):
        return tensors.dtype not in FLOAT_DTYPES or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(all_finite(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(all_finite(value) for value in tensors)
    return not isinstance(tensors, float) or math.isfinite(tensors)


# What torch.load(weights_only=True) imports for plain data, besides torch's own tensor rebuilders.
WEIGHTS_ONLY_GLOBALS = {"collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                        "builtins.slice", "builtins.complex", "_codecs.encode"}


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
    """What a checkpoint of train.py holds: everything a resume needs to go on exactly."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config,
            "metrics": metrics, "rng": {"data_order": order_generator.get_state(), "torch": torch.get_rng_state()},
            "torch_version": str(torch.__version__)}


def check_unpacked_size(path):
    """Refuse, before loading, a checkpoint whose zip entries would unpack to far more than the file.

    torch.save stores its entries uncompressed, so a real checkpoint unpacks to about its own size;
    a small file that inflates to gigabytes is a zip bomb, read from the zip's directory alone.
    """
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy format is read by torch.load, which checks it
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(entry.file_size for entry in archive.infolist())
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return  # torch.load says what is wrong with it
    if unpacked > 2 * os.path.getsize(path) + (16 << 20):
        raise UsageError(f"{path} would unpack to {unpacked:,} bytes from {os.path.getsize(path):,}: "
                         "not a checkpoint torch.save wrote; refused")


def pickle_globals(path):
    """The module.name of every class or function that unpickling the file would import.

    Read from the pickle's opcodes without running any of it: torch.load's own message about a
    refused import is worded differently from one torch version to the next.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.endswith("data.pkl")]
                streams = [archive.read(names[0])] if names else []
        else:
            with open(path, "rb") as file:
                streams = [file.read()]
    except (OSError, zipfile.BadZipFile, RuntimeError):
        return []
    found = []
    for data in streams:
        start = 0
        while start < len(data):  # the legacy format is several pickles one after another
            strings, end = [], None
            try:
                for opcode, argument, position in pickletools.genops(data[start:]):
                    if opcode.name in ("GLOBAL", "INST"):
                        found.append(argument.replace(" ", ".", 1))
                    elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
                    elif isinstance(argument, str):
                        strings.append(argument)
                    elif opcode.name == "STOP":
                        end = start + position + 1
            except Exception:  # not a pickle (the legacy format's raw tensor bytes): stop reading
                break
            if end is None:
                break
            start = end
    return found


def written_by_torch_save(path):
    """True if the file starts as torch.save writes: a zip archive, or (its legacy format) a pickle."""
    try:
        with open(path, "rb") as file:
            start = file.read(2)
    except OSError:
        return False
    return zipfile.is_zipfile(path) or (len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5)


def load_checkpoint(path, trust_pickle=False):
    """Read a checkpoint safely, onto the CPU: our dict, a bare state_dict, or (trust_pickle) a pickled model.

    Always returns our dict format, checked (checked_checkpoint) before anything is built from it; for
    a bare state_dict or a pickled model, `epoch` is 0 and the config holds only the widths.
    """
    existing_file(path, "checkpoint")
    if not written_by_torch_save(path):
        raise UsageError(f"{path} is not a checkpoint written by train.py (not a file that torch.save wrote)")
    check_unpacked_size(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        unsafe = [name for name in pickle_globals(path) if name not in WEIGHTS_ONLY_GLOBALS
                  and (not name.startswith("torch.") or name.startswith("torch.nn."))]
        if not unsafe:
            raise UsageError(f"{path} is not a checkpoint written by train.py ({reason(error, 120)})") from None
        if not trust_pickle:
            if any(name.startswith(("__main__.", "torch.nn.")) for name in unsafe):
                raise UsageError(f"{path} is a pickled model (torch.save(model, ...)); loading it would run "
                                 f"{', '.join(unsafe[:3])} from the file: pass --trust-pickle if you trust where "
                                 "it came from") from None
            raise UsageError(f"{path} is refused: loading it would run {unsafe[0]} (unsafe pickle); "
                             "pass --trust-pickle only if you trust where it came from") from None
        print(f"warning: --trust-pickle: loading {path} runs code from the file", file=sys.stderr)
        try:
            data = _load_trusting_pickle(path)
        except Exception as trusted_error:
            raise UsageError(f"{path} cannot be loaded even with --trust-pickle ({reason(trusted_error)})") from None
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


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "config", "metrics", "rng", "torch_version")  # training_state's


def checked_checkpoint(path, data):
    """`data` from a checkpoint file as our dict, or a one-line UsageError naming the field that breaks a rule.

    Every field is checked before anything is built from it: a small file must not be able to
    make us allocate gigabytes (stride-0 tensors, huge widths) or crash with a traceback.
    """
    if isinstance(data, nn.Module):
        data = {name: tensor.detach() for name, tensor in data.state_dict().items()}
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        checkpoint = dict(data)
    elif isinstance(data, dict) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
        checkpoint = {"model": data}
    else:
        raise UsageError(f"{path} is not a checkpoint written by train.py: it holds no model weights "
                         "(expected a checkpoint or a state_dict)")
    check_weights(path, checkpoint["model"])
    config = checkpoint.setdefault("config", {})
    if not isinstance(config, dict):
        raise UsageError(f"{path}: its config is a {type(config).__name__}, not a dict")
    config = checkpoint["config"] = dict(config)
    check_config(path, config)
    if "hidden" not in config:
        config["hidden"] = models.args_from_weights(checkpoint["model"])
        if config["hidden"] is None:
            raise UsageError(f"{path} records no widths, and {models.signature_text()} in mnist_mlp.py needs them")
    epoch = checkpoint.setdefault("epoch", 0)
    if type(epoch) is not int or not 0 <= epoch <= 1_000_000:
        raise UsageError(f"{path}: its epoch is {epoch!r}, not a whole number from 0 to 1,000,000")
    metrics = checkpoint.get("metrics", {})
    if not (isinstance(metrics, dict) and all(isinstance(key, str) and type(value) in (int, float, type(None))
                                              for key, value in metrics.items())):
        raise UsageError(f"{path}: its metrics entry is not a dict of names to numbers")
    unknown = [key for key in checkpoint if key not in CHECKPOINT_KEYS]
    if unknown:
        raise UsageError(f"{path} is not a checkpoint written by train.py: it holds an entry {brief(unknown[0], 30)!r}")
    return checkpoint


def check_weights(path, state):
    """The weights' rule: names are strings; each value a dense, strided CPU tensor of FLOAT_DTYPES or
    INTEGER_DTYPES that stores every value it claims (no stride trick); all finite."""
    for name, tensor in state.items():
        shown = brief(name, 60)
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise UsageError(f"{path}: its weights hold {shown}: {type(tensor).__name__}, not a name and a tensor")
        problem = tensor_problem(tensor)
        if problem:
            raise UsageError(f"{path}: {shown} {problem}")
    if not all_finite(state):
        raise UsageError(f"{path}: its weights hold NaN or infinity (the run that wrote it diverged)")


def tensor_problem(tensor, dtypes=FLOAT_DTYPES + INTEGER_DTYPES):
    """Why `tensor` breaks the tensor rule (a dense, strided CPU tensor of `dtypes` storing every value
    it claims: no stride trick that makes a small file a large tensor), or None."""
    if tensor.layout != torch.strided or tensor.device.type != "cpu" or tensor.dtype not in dtypes:
        return (f"is a {tensor.dtype} {tensor.layout} tensor on {tensor.device.type}, not a plain dense tensor "
                f"of {'a float or integer dtype' if dtypes == FLOAT_DTYPES + INTEGER_DTYPES else dtypes[0]}")
    span = 1 + tensor.storage_offset() + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    if tensor.numel() and tensor.untyped_storage().nbytes() < max(span, tensor.numel()) * tensor.element_size():
        return f"claims {tensor.numel():,} values but stores fewer (a stride trick); refused"
    return None


def _whole(value, low, high):
    return type(value) is int and low <= value <= high


def check_config(path, config):
    """The config's rule: each field train.py writes has its type and range (any field may be absent)."""
    def refuse(key, what):
        raise UsageError(f"{path}: its config's {key} is {brief(config[key], 40)!r}, not {what}")

    if "hidden" in config and not (isinstance(config["hidden"], (list, tuple)) and len(config["hidden"]) <= 64
                                   and all(_whole(width, 1, MAX_WIDTH) for width in config["hidden"])):
        refuse("hidden", f"a list of widths from 1 to {MAX_WIDTH}")
    if "hidden" in config:
        config["hidden"] = list(config["hidden"])
    if "inputs" in config and not (isinstance(config["inputs"], str) and config["inputs"] in mnist_mlp.INPUT_SCALINGS):
        refuse("inputs", f"one of {', '.join(mnist_mlp.INPUT_SCALINGS)}")
    if "dataset" in config and not (isinstance(config["dataset"], str) and config["dataset"] in mnist_mlp.DATASETS):
        refuse("dataset", f"one of {', '.join(mnist_mlp.DATASETS)}")
    for key in ("val_size", "seed", "batch_size"):
        if key in config and not _whole(config[key], 0, 2**63 - 1):
            refuse(key, "a whole number of 0 or more")
    if "model_source" in config and config["model_source"] is None:  # its source could not be read: no record
        del config["model_source"]
    for key in ("run", "model_source"):
        if key in config and not (isinstance(config[key], str) and 0 < len(config[key]) <= 64
                                  and config[key].isascii() and config[key].isalnum()):
            refuse(key, "a run identity" if key == "run" else "a source fingerprint")
    if config.get("val_size") and "seed" not in config:
        raise UsageError(f"{path}: it held out {config['val_size']} validation images but records no seed")


def input_scaling(checkpoint):
    """How a checked checkpoint's model reads pixels (mnist_mlp.INPUT_SCALINGS): what it was trained on."""
    return checkpoint["config"].get("inputs", "tutorial")


def dataset_classes(checkpoint):
    """The class names of the dataset a checked checkpoint was trained on."""
    return mnist_mlp.DATASETS[checkpoint["config"].get("dataset", "mnist")][1]


def model_from_checkpoint(path, checkpoint, device="cpu"):
    """The current NoteModel with a checked checkpoint's weights, on `device` (models.model_from_checkpoint)."""
    return models.model_from_checkpoint(path, checkpoint, dataset_classes(checkpoint), device)


# ----------------------------------------------------------------------------- resuming

FLAGS = {"hidden": "--hidden", "optimizer": "--optimizer", "lr": "--lr", "momentum": "--momentum",
         "weight_decay": "--weight-decay", "inputs": "--inputs",
         "batch_size": "--batch-size", "seed": "--seed", "dataset": "--dataset", "val_size": "--val-size",
         "fused": "--fused", "threads": "--threads"}


def resume_widths(path, saved, hidden):
    """The widths to build NoteModel with to resume a checkpoint: --hidden where given (it must be the
    checkpoint's), else the checkpoint's as the current NoteModel takes them (its weights must then fit)."""
    if hidden is None:
        return models.args_for_current(saved["hidden"])
    if list(hidden) != list(saved["hidden"]):
        raise UsageError(f"{path} has widths {list(saved['hidden'])}, but --hidden is {' '.join(map(str, hidden))}; "
                         f"pass --hidden {' '.join(map(str, saved['hidden']))}, or leave --hidden out to take the "
                         "checkpoint's")
    return models.constructor_args(hidden)


def check_resume_config(path, saved, current):
    """Refuse to resume a run with other settings than the checkpoint's (the model is the weights' to fit)."""
    if "optimizer" not in saved:
        return  # a bare state_dict or a tutorial file: weights only
    differences = [f"{FLAGS.get(key, key)}: checkpoint {saved[key]!r}, now {value!r}"  # not the run, nor the code:
                   for key, value in current.items()                                   # models.py warns of that
                   if key in saved and key not in ("run", "model_source", "hidden") and saved[key] != value]
    if differences:
        raise UsageError(f"{path} was trained with other settings ({'; '.join(differences)}); "
                         "pass the same flags to resume it exactly")


def restore_training_state(path, resumed, config, optimizer, order_generator):
    """Load a checkpoint's optimizer and generator states; returns the epoch to go on from."""
    check_resume_config(path, resumed["config"], config)
    if "optimizer" not in resumed:
        return 0  # weights only: a fresh optimizer, epoch numbers from 1
    check_optimizer_state(path, resumed["optimizer"], optimizer, config)
    try:
        optimizer.load_state_dict(resumed["optimizer"])
    except Exception as error:  # a malformed entry: torch raises several kinds
        raise UsageError(f"{path}: its optimizer state does not fit ({reason(error)})") from None
    if not all_finite(resumed["optimizer"]):
        raise UsageError(f"{path}: its optimizer state holds NaN or infinity; resume from an earlier checkpoint")
    rng = resumed.get("rng")
    if rng is None:
        print(f"warning: {path} records no random-generator state: the batch order from here on will "
              "differ from an uninterrupted run's", file=sys.stderr)
    else:
        try:
            order_generator.set_state(rng["data_order"])
            torch.set_rng_state(rng["torch"])
        except Exception as error:
            raise UsageError(f"{path}: its rng entry is malformed ({reason(error)})") from None
    return resumed["epoch"]


def check_optimizer_group(group, ours, name, refuse):
    """The param group's rule: only the keys the configured optimizer makes, each a plain value of its
    type; what the optimizer computes with (amsgrad, nesterov, ...) as this run's optimizer has it, and
    only how torch runs it (foreach, fused) may differ. The hyper-parameters are compared with the flags after."""
    for key, value in group.items():
        if key == "params":
            continue
        if not isinstance(key, str) or key not in ours:
            refuse(f"has a param group entry {brief(key, 30)!r} that {name} does not make")
        expected = ours[key]
        if key in ("foreach", "fused"):
            plain = value is None or type(value) is bool
        elif key == "betas":
            plain = isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) in (int, float) for v in value)
        elif type(expected) in (int, float):
            plain = type(value) in (int, float) and math.isfinite(value)
        else:
            plain = type(value) is type(expected) and value == expected
        if not plain:
            refuse(f"has {key} {brief(value, 30)}, where {name} here has {expected!r}")


def check_optimizer_state(path, saved, optimizer, config):
    """Refuse an optimizer state that does not fit this run whole, before torch builds anything from it:
    its structure, each state tensor's dtype, layout, device and shape against its parameter, the step
    counts, and every hyperparameter of its param_groups against the run's flags."""
    def refuse(what):
        raise UsageError(f"{path}: its optimizer state {what}; resume from another checkpoint")

    parameters = optimizer.param_groups[0]["params"]
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list) and len(saved["param_groups"]) == 1
            and isinstance(saved["param_groups"][0], dict)):
        refuse("is not one param group and a state dict, as the optimizer saves them")
    group = saved["param_groups"][0]
    params = group.get("params")
    if not (isinstance(params, list) and all(type(index) is int for index in params)
            and params == list(range(len(parameters)))):
        refuse(f"names parameters {brief(params, 60)}, not the model's {len(parameters)}")
    check_optimizer_group(group, optimizer.param_groups[0], config.get("optimizer", "adam"), refuse)
    for key in ("lr", "momentum", "betas", "eps", "weight_decay"):
        if key in config and key in group:
            value = list(group[key]) if isinstance(group[key], (list, tuple)) else group[key]
            if value != config[key]:
                where = f"({FLAGS[key]})" if key in FLAGS else "(train.py always uses the default)"
                refuse(f"says {key} {group[key]!r}, but this run's is {config[key]!r} {where}")
    name = config.get("optimizer", "adam")
    kind = optimizers.OPTIMIZERS[name]  # each state tensor of the parameter's shape, and the step count
    steps = set()
    for index, state in saved["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(parameters)) or not isinstance(state, dict):
            refuse(f"has an entry {brief(index, 20)} that is no parameter of the model")
        expected = set(kind.state_tensors) | ({"step"} if kind.counts_steps else set())
        if set(state) != expected:
            refuse(f"for parameter {index} holds {sorted(map(str, state))}, not {sorted(expected)}")
        for key in kind.state_tensors:
            tensor, parameter = state[key], parameters[index]
            if tensor is None and key == "momentum_buffer":  # torch's SGD before its first step
                continue
            if not (isinstance(tensor, torch.Tensor) and tensor_problem(tensor, (torch.float32,)) is None
                    and tensor.shape == parameter.shape):
                refuse(f"{key} of parameter {index} is not a float32 tensor of shape {list(parameter.shape)}")
        if "step" in state:
            step = state["step"]
            if isinstance(step, torch.Tensor) and tensor_problem(step) is not None:
                refuse(f"step count of parameter {index} {tensor_problem(step)}")
            value = float(step) if isinstance(step, (int, float)) or (
                isinstance(step, torch.Tensor) and step.numel() == 1 and step.is_floating_point()) else -1.0
            if not (0 <= value <= 1e9 and value == int(value)):
                refuse(f"step count of parameter {index} is {brief(step, 30)}, not a whole number")
            steps.add(value)
    if len(steps) > 1:
        refuse(f"has different step counts per parameter ({sorted(steps)[:3]}): not one that train.py saved")
