"""The tutorial's MNIST multilayer perceptron, its data, its training step and its checkpoints.

train.py and evaluate.py are thin command-line wrappers around the functions here.
Nothing runs at import time.
"""

import argparse
import contextlib
import gzip
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import types
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The bundled data lives beside this file, so `python train.py` works from any folder, offline.
DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CHECKPOINT_NAME = "noteLearning_{epoch}.pth"

# --dataset name -> (torchvision class name, which is also its folder under --data-dir, class names)
DATASETS = {
    "mnist": ("MNIST", [str(digit) for digit in range(10)]),
    "fashion-mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


class UsageError(Exception):
    """Bad input from the user: the scripts print `error: <message>` and exit with code 2."""


# ----------------------------------------------------------------------------- command lines

def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit code 2), without the usage dump."""

    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------------- model

class NoteModel(nn.Module):
    """784 -> 128 -> 64 -> 10 with ReLU between layers, as in the tutorial.

    Other hidden sizes give layers fc1 ... fcN; the defaults give exactly the tutorial's
    state_dict (keys and shapes), so weights move between the two.
    """

    def __init__(self, hidden=(128, 64)):
        super().__init__()
        sizes = [784, *hidden, 10]
        for number, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            setattr(self, f"fc{number}", nn.Linear(n_in, n_out))

    @property
    def layers(self):
        return list(self.children())

    def forward(self, x):
        x = x.view(-1, 784)  # (N, 1, 28, 28) and (N, 784) both work
        *hidden_layers, output_layer = self.layers
        for layer in hidden_layers:
            x = F.relu(layer(x))
        return output_layer(x)


def hidden_sizes(state_dict):
    """The hidden sizes of the NoteModel that a state_dict belongs to."""
    weights = [value for key, value in state_dict.items() if key.endswith(".weight")]
    return [weight.shape[0] for weight in weights[:-1]]


# ----------------------------------------------------------------------------- devices

def _mps_available():
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name):
    """torch.device for --device: auto picks cuda, then mps, then cpu; never a silent fallback."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type == "mps":
        if not _mps_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type != "cpu":
        raise UsageError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


# ----------------------------------------------------------------------------- files

def atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a half.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        raise


# ----------------------------------------------------------------------------- data

def raw_folder(data_dir, dataset):
    return os.path.join(data_dir, DATASETS[dataset][0], "raw")


def decompress_raw_files(folder):
    """Gunzip each folder/*.gz whose decompressed file is missing (temp file, then rename).

    torchvision reads the decompressed IDX files; left compressed, it would try to download
    them again, since our .gz copies' checksums differ from the ones it expects.
    """
    if not os.path.isdir(folder):
        return
    for name in sorted(os.listdir(folder)):
        target = os.path.join(folder, name[:-3])
        if not name.endswith(".gz") or os.path.exists(target):
            continue
        source = os.path.join(folder, name)
        try:
            with gzip.open(source, "rb") as compressed:
                atomic_write(target, lambda file: shutil.copyfileobj(compressed, file, 1 << 20))
        except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
            raise UsageError(f"cannot decompress {source} ({_reason(error)})") from None


def check_idx_file(path, ndim):
    """Refuse a file that is not a complete IDX file of unsigned bytes with `ndim` dimensions."""
    with open(path, "rb") as file:
        header = file.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise UsageError(f"{path} is truncated: not an IDX file")
    magic, *dims = struct.unpack(f">{1 + ndim}I", header)
    if magic != 0x800 + ndim:
        raise UsageError(f"{path} is not an IDX file of {ndim}-D bytes (magic {magic:#010x}, "
                         f"expected {0x800 + ndim:#010x})")
    expected_size = len(header) + math.prod(dims)
    if os.path.getsize(path) != expected_size:
        raise UsageError(f"{path} has {os.path.getsize(path)} bytes, its header promises {expected_size}: "
                         "truncated or corrupt")


@dataclass
class Split:
    """One split of a dataset: raw pixels (N, 784) uint8 and labels (N,) int64, on one device.

    Keeping the pixels as bytes and normalizing each batch costs about 25 microseconds a step
    (on one core) and saves the 4x memory of a float copy of the whole dataset.
    """
    pixels: torch.Tensor
    labels: torch.Tensor

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.pixels[indices], self.labels[indices])

    def to(self, device):
        return Split(self.pixels.to(device), self.labels.to(device))


def normalize(pixels):
    """Bytes to the tutorial's inputs, bit for bit: Normalize((0.5,), (0.5,))(ToTensor()(image)).

    ToTensor divides by 255 in float32; Normalize subtracts the mean and divides by the std.
    """
    return pixels.float().div_(255).sub_(0.5).div_(0.5)


def load_dataset(data_dir, dataset="mnist", download=True):
    """(train Split, test Split) on the CPU, read by torchvision from data_dir/<Dataset>/raw/."""
    from torchvision import datasets  # imported here: evaluate of a bad path should not wait for it

    class_name = DATASETS[dataset][0]
    folder = raw_folder(data_dir, dataset)
    if os.path.exists(data_dir) and not (os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK)):
        raise UsageError(f"cannot read the data folder {data_dir}: not a readable folder")
    decompress_raw_files(folder)
    present = all(os.path.exists(os.path.join(folder, name)) for name in RAW_FILES)
    if not present and not download:
        raise UsageError(_missing_data_message(folder, dataset))
    if present:
        for name in RAW_FILES:
            check_idx_file(os.path.join(folder, name), ndim=3 if "images" in name else 1)
    splits = []
    for train in (True, False):
        try:
            torchvision_dataset = getattr(datasets, class_name)(data_dir, train=train, download=not present)
        except Exception as error:  # torchvision raises many kinds: offline, corrupt, permissions
            if not present:
                raise UsageError(f"{_missing_data_message(folder, dataset)} (download failed: {_reason(error)})") from None
            raise UsageError(f"cannot read {dataset} from {folder} ({_reason(error)})") from None
        present = True  # the first split's download fetched all four files
        images, labels = torchvision_dataset.data, torchvision_dataset.targets
        if images.dim() != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise UsageError(f"{folder}: expected N images of 28x28 and N labels, "
                             f"got images {tuple(images.shape)} and {len(labels)} labels")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9:
            raise UsageError(f"{folder}: labels must be 0..9")
        splits.append(Split(images.reshape(-1, 784), labels.long()))
    return splits[0], splits[1]


def _missing_data_message(folder, dataset):
    return (f"{dataset} data not found: put {', '.join(RAW_FILES)} (or their .gz) into {folder}, "
            "or point --data-dir at a folder that has them")


def split_validation(train, val_size, seed):
    """Hold out val_size seeded training images: (train Split, validation Split or None)."""
    if val_size == 0:
        return train, None
    if not 0 < val_size < len(train):
        raise UsageError(f"--val-size must be between 0 and {len(train) - 1}, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:]), train.subset(order[:val_size])


def epoch_order(n, generator):
    """The order DataLoader(dataset, shuffle=True, generator=generator) visits n samples in an epoch.

    Making the same draws from the generator keeps our batches identical to the tutorial's:
    the DataLoader's iterator first draws a 64-bit base seed (for workers), then its
    RandomSampler draws randperm(n); when the epoch is consumed the sampler runs on and draws
    one more, unused, randperm(n).
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


# ----------------------------------------------------------------------------- training

def make_optimizer(name, parameters, lr, momentum=0.9, fused=True):
    """Adam (the tutorial's) or SGD; fused=True takes the one-kernel version where torch has it.

    Fused Adam computes the same update as the default for-loop Adam, with different rounding
    in the last bit; fused SGD is bit-identical to the default.
    """
    parameters = list(parameters)
    options = {"lr": lr} if name == "adam" else {"lr": lr, "momentum": momentum}
    optimizer_class = torch.optim.Adam if name == "adam" else torch.optim.SGD
    if fused:
        try:
            return optimizer_class(parameters, fused=True, **options)
        except (RuntimeError, TypeError):  # older torch: fused only on CUDA, or not at all
            pass
    return optimizer_class(parameters, **options)


def optimizer_config(optimizer):
    """The hyper-parameters that rebuild `optimizer`: plain values for the checkpoint."""
    group = optimizer.param_groups[0]
    name = "adam" if isinstance(optimizer, torch.optim.Adam) else "sgd"
    keys = ("lr", "betas", "eps", "weight_decay") if name == "adam" else ("lr", "momentum", "weight_decay")
    config = {key: group[key] for key in keys}
    if "betas" in config:
        config["betas"] = list(config["betas"])
    return {"optimizer": name, **config}


class TrainStep:
    """One optimizer step on a batch, with the MLP's backward pass written out by hand.

    For Linear layers y = x W^T + b and ReLU, back-propagating g = dLoss/dy gives
        dW = g^T x,   db = sum of g over the batch,   dx = g W,   and ReLU passes g where y > 0.
    The gradients land in preallocated .grad tensors, so a step allocates almost nothing, and
    the whole step costs about two thirds of autograd's. Every kernel is the one autograd itself
    runs, so the gradients are bit-identical to loss.backward() (a test checks it).
    """

    def __init__(self, model, optimizer):
        self.layers = model.layers
        self.optimizer = optimizer
        for parameter in model.parameters():
            parameter.grad = torch.zeros_like(parameter)
        self.one = torch.ones((), device=model.fc1.weight.device)

    @torch.no_grad()
    def __call__(self, x, labels):
        """Returns the batch's mean cross-entropy loss as a 0-d tensor (no host sync)."""
        inputs = [x]  # the input of each layer, kept for the backward pass
        for index, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias, x, layer.weight.t())
            if index < len(self.layers) - 1:
                x = x.relu_()
                inputs.append(x)
        log_probs = torch.log_softmax(x, dim=1)
        loss = F.nll_loss(log_probs, labels)

        # d(mean cross-entropy)/d(logits) = (softmax(logits) - onehot(labels)) / N, computed
        # by the two kernels that autograd runs for nll_loss and log_softmax (reduction 1 = mean,
        # -100 = the default ignore_index, total weight = the batch size).
        batch_size = self.one.new_full((), len(labels))
        grad = torch.ops.aten.nll_loss_backward(self.one, log_probs, labels, None, 1, -100, batch_size)
        grad = torch.ops.aten._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype)
        for index in reversed(range(len(self.layers))):
            layer, layer_input = self.layers[index], inputs[index]
            torch.mm(grad.t(), layer_input, out=layer.weight.grad)
            torch.sum(grad, dim=0, out=layer.bias.grad)
            if index > 0:
                grad = torch.ops.aten.threshold_backward(grad.mm(layer.weight), layer_input, 0)
        self.optimizer.step()
        return loss


@dataclass
class EpochResult:
    step_losses: torch.Tensor  # each step's mean loss, in order
    batch_sizes: torch.Tensor

    @property
    def mean_loss(self):
        return float((self.step_losses * self.batch_sizes).sum() / self.batch_sizes.sum())


class NonFiniteLoss(Exception):
    def __init__(self, step):
        super().__init__(f"the loss became non-finite at step {step}")
        self.step = step


def train_epoch(step, train, order, batch_size, log_interval=100, log=None, should_stop=None):
    """Run one epoch of `step` over `train` in `order`; returns an EpochResult, or None if stopped.

    Losses stay on the device and are read only every log_interval steps, so the device never
    waits for the host. log(step_number, steps, mean loss since the last log) is called then.
    should_stop() is asked between steps (Ctrl-C). Raises NonFiniteLoss naming the first bad step.
    """
    order = order.to(train.pixels.device)
    steps = (len(order) + batch_size - 1) // batch_size
    losses = []
    for step_index in range(steps):
        if should_stop is not None and should_stop():
            return None
        batch = order[step_index * batch_size:(step_index + 1) * batch_size]
        # index_select is the cheapest gather: 10x faster than pixels[batch] on the CPU.
        x = normalize(train.pixels.index_select(0, batch))
        losses.append(step(x, train.labels.index_select(0, batch)))
        if (step_index + 1) % log_interval == 0 or step_index + 1 == steps:
            recent = torch.stack(losses[-(step_index % log_interval + 1):])
            if not bool(recent.isfinite().all()):
                first_bad = len(losses) - len(recent) + int((~recent.isfinite()).nonzero()[0]) + 1
                raise NonFiniteLoss(first_bad)
            if log is not None and (step_index + 1) % log_interval == 0:
                log(step_index + 1, steps, float(recent.mean()))
    sizes = torch.full((steps,), float(batch_size), device=order.device)
    sizes[-1] = len(order) - (steps - 1) * batch_size
    return EpochResult(torch.stack(losses), sizes)


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy
    correct: int
    total: int
    confusion: torch.Tensor  # (classes, classes) counts, rows = true class

    @property
    def accuracy(self):
        """Percent."""
        return 100.0 * self.correct / self.total

    @property
    def per_class(self):
        """Percent of each true class classified right."""
        return (100.0 * self.confusion.diag() / self.confusion.sum(1).clamp(min=1)).tolist()


@torch.no_grad()
def logits_in_batches(model, split, batch_size=1000):
    """Yield (labels, logits) for `split`, batch_size samples at a time, in order."""
    for start in range(0, len(split), batch_size):
        yield split.labels[start:start + batch_size], model(normalize(split.pixels[start:start + batch_size]))


@torch.no_grad()
def evaluate(model, split, batch_size=1000, classes=10):
    """Mean loss, accuracy and confusion matrix of `model` on `split`."""
    loss_sum = torch.zeros((), device=split.pixels.device)
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=split.pixels.device)
    for labels, logits in logits_in_batches(model, split, batch_size):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * classes + logits.argmax(1), minlength=classes * classes)
    confusion = confusion.view(classes, classes).cpu()
    return Evaluation(float(loss_sum) / len(split), int(confusion.diag().sum()), len(split), confusion)


def misclassified(model, split, limit=64, batch_size=1000):
    """(indices, predictions) of the first `limit` misclassified samples of `split`."""
    predictions = torch.cat([logits.argmax(1) for _, logits in logits_in_batches(model, split, batch_size)])
    wrong = (predictions != split.labels).nonzero().flatten()[:limit]
    return wrong.cpu(), predictions[wrong].cpu()


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write a checkpoint dict atomically: a crash never leaves half a file under `path`."""
    atomic_write(path, lambda file: torch.save(checkpoint, file))


def _load_trusting_pickle(path, map_location):
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
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=pickle_module)


def load_checkpoint(path, map_location="cpu", trust_pickle=False):
    """Read a checkpoint safely: our dict, a bare state_dict, or (trust_pickle) a pickled model.

    Always returns our dict format; for a bare state_dict or a pickled model, only `model`
    (and `epoch` 0 and an empty config) are filled in.
    """
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: permission denied")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # what weights_only refused to import
        if refused is None:
            raise UsageError(f"{path} is not a readable checkpoint ({_reason(error)})") from None
        if not trust_pickle:
            name = refused.group(1)
            if name.startswith(("__main__.", "torch.nn.")):
                raise UsageError(f"{path} is a pickled model (torch.save(model, ...)); loading it runs code "
                                 "from the file: pass --trust-pickle if you trust where it came from") from None
            raise UsageError(f"{path} is refused: loading it would run {name} (unsafe pickle); "
                             "pass --trust-pickle only if you trust where it came from") from None
        print(f"warning: --trust-pickle: loading {path} runs code from the file", file=sys.stderr)
        try:
            data = _load_trusting_pickle(path, map_location)
        except Exception as trusted_error:
            raise UsageError(f"{path} cannot be loaded even with --trust-pickle ({_reason(trusted_error)})") from None
    return _as_checkpoint(path, data)


def _reason(error, limit=300):
    """An exception as one short line for an `error:` message."""
    text = " ".join(str(error).split()) or "no details"
    if "WeightsUnpickler error:" in text:  # torch.load's long advice; keep the part that says why
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(error).__name__}: {text[:limit]}"


def _as_checkpoint(path, data):
    if isinstance(data, nn.Module):
        data = data.state_dict()
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        checkpoint = data
    elif isinstance(data, dict) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
        checkpoint = {"model": data, "epoch": 0, "config": {}}
    else:
        raise UsageError(f"{path} holds no model weights (expected a checkpoint or a state_dict)")
    state = checkpoint["model"]
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UsageError(f"{path}: its model entry is not a state_dict")
    checkpoint.setdefault("config", {})
    checkpoint.setdefault("epoch", 0)
    checkpoint["config"].setdefault("hidden", hidden_sizes(state))
    return checkpoint


def model_from_checkpoint(path, checkpoint, device="cpu"):
    """The NoteModel a checkpoint describes, with its weights, on `device`."""
    hidden = list(checkpoint["config"]["hidden"])
    model = NoteModel(hidden)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise UsageError(f"{path} does not fit a NoteModel with hidden sizes {hidden}: {detail}") from None
    return model.to(device)


# ----------------------------------------------------------------------------- Adam, by hand

def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """One Adam step in place, written out to answer the tutorial's question about bias correction.

    m and v are running averages of the gradient and its square, started at zero. Early on
    they are biased toward zero: after one step m = (1 - beta1) g, a tenth of g. Dividing by
    (1 - beta^t) undoes exactly that bias, so the first steps have the intended size
    (about lr per weight) instead of creeping up over the first few thousand steps.
    """
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)                    # m_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)       # v_t
    m_hat = exp_avg / (1 - beta1 ** step)                              # m_t / (1 - beta1^t)
    v_hat = exp_avg_sq / (1 - beta2 ** step)                           # v_t / (1 - beta2^t)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))
