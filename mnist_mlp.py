"""The tutorial's MNIST multilayer perceptron in one file: the model, the data, the training step,
an epoch, evaluation, and Adam written out. It imports only torch and the standard library, so it can
be copied alone; the rest of the project (speed, safe files, the commands) builds on it.

The whole tutorial, from these pieces (with the four MNIST files in data/MNIST/raw/):

    import torch
    from torch import nn
    from mnist_mlp import NoteModel, load_dataset, normalize, epoch_order, textbook_step, evaluate

    train, test = load_dataset("data")
    torch.manual_seed(1)
    model, criterion = NoteModel(), nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    order = torch.Generator().manual_seed(1)  # the DataLoader's shuffle, seeded
    for epoch in range(1, 21):
        for batch in epoch_order(len(train), order).split(64):
            textbook_step(model, criterion, optimizer, normalize(train.pixels[batch]), train.labels[batch])
        print(f"epoch {epoch}: test accuracy {evaluate(model, test).accuracy:.2f}%")
        torch.save(model.state_dict(), f"noteLearning_{epoch}.pth")
"""

import gzip
import math
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


# ============================================================================= 1. the model
class NoteModel(nn.Module):
    """784 -> 128 -> 64 -> 10 with ReLU between layers, as the tutorial writes it.

    Edit it freely (layers, widths, an __init__ without arguments): every command builds the NoteModel
    written here; train.py trains whatever forward() computes on (N, 1, 28, 28) images.
    """

    def __init__(self, hidden1=128, hidden2=64):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 10)

    def forward(self, x):
        x = x.view(-1, 784)  # (N, 1, 28, 28) images to (N, 784) rows
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


# ============================================================================= 2. the data

# dataset name -> (its folder under the data folder, as torchvision names it; its class names)
FASHION = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(",")
DATASETS = {"mnist": ("MNIST", [str(digit) for digit in range(10)]), "fashion-mnist": ("FashionMNIST", FASHION)}
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


# how bytes become the model's inputs: the tutorial's transform (in [-1, 1]), or ToTensor alone (in [0, 1])
INPUT_SCALINGS = {"tutorial": "p / 127.5 - 1", "zero-one": "p / 255"}


@dataclass
class Split:
    """One split of a dataset: pixels (N, 784) uint8 and labels (N,) int64, on one device, and the input
    scaling of its batches (a dataset's transform). The pixels stay bytes and each batch is normalized as it
    is used: about 20 microseconds a step, against four times the memory for a float copy of the dataset."""

    pixels: torch.Tensor
    labels: torch.Tensor
    scaling: str = "tutorial"

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return Split(self.pixels[indices], self.labels[indices], self.scaling)

    def to(self, device):
        return Split(self.pixels.to(device), self.labels.to(device), self.scaling)


def normalize(pixels, scaling="tutorial"):
    """(N, 784) bytes to the tutorial's inputs, bit for bit: (N, 1, 28, 28) images, each one
    Normalize((0.5,), (0.5,))(ToTensor()(image)), as its DataLoader gives them to the model.

    ToTensor gives p / 255 and Normalize (x - 0.5) / 0.5, which is p / 127.5 - 1. In float32 the one
    division rounds to the very bits of the three-step form for each of the 256 byte values (a test
    checks all of them), in one pass over the batch instead of four. scaling="zero-one": p / 255.
    """
    if scaling not in INPUT_SCALINGS:
        raise ValueError(f"unknown input scaling {scaling!r}: one of {', '.join(INPUT_SCALINGS)}")
    return (pixels.div(255.0) if scaling == "zero-one" else pixels.div(127.5).sub_(1)).view(-1, 1, 28, 28)


def read_idx(path, ndim):
    """The uint8 tensor in an IDX file (gzip-compressed when its name ends in .gz).

    An IDX file is a header, 0x0800 + ndim then each dimension as a big-endian uint32, followed by
    the bytes. No more is read than the header promises, and it may promise at most 2 GiB: a small
    corrupt file cannot fill the memory.
    """
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as file:
        header = file.read(4 + 4 * ndim)
        if len(header) < 4 + 4 * ndim or struct.unpack(">I", header[:4])[0] != 0x800 + ndim:
            raise ValueError(f"{path} is not an IDX file of {ndim}-D bytes (truncated, or another magic number)")
        dims = struct.unpack(f">{ndim}I", header[4:])
        if math.prod(dims) > 1 << 31:
            raise ValueError(f"{path} claims {dims[0]:,} items, more than 2 GiB")
        data = bytearray(math.prod(dims))
        if file.readinto(data) != len(data) or file.read(1):
            raise ValueError(f"{path} does not hold the {len(data):,} bytes its header promises: truncated or corrupt")
    return torch.frombuffer(data, dtype=torch.uint8).view(*dims) if data else torch.zeros(dims, dtype=torch.uint8)


def load_dataset(data_dir, dataset="mnist"):
    """(train Split, test Split) on the CPU, from the four IDX files in data_dir/MNIST/raw/ (or .gz)."""
    folder = os.path.join(data_dir, DATASETS[dataset][0], "raw")
    paths = []
    for name in RAW_FILES:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            path += ".gz"
        if not os.path.exists(path):
            raise FileNotFoundError(f"{dataset} data not found: put {', '.join(RAW_FILES)} (or .gz) into {folder}")
        paths.append(path)
    splits = []
    for images_path, labels_path in (paths[:2], paths[2:]):
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels) or len(labels) == 0:
            shapes = f"images {tuple(images.shape)} and {len(labels)} labels"
            raise ValueError(f"{folder}: expected N > 0 images of 28x28 and N labels, got {shapes}")
        if int(labels.max()) >= len(DATASETS[dataset][1]):
            raise ValueError(f"{labels_path}: labels must be 0..{len(DATASETS[dataset][1]) - 1}")
        splits.append(Split(images.reshape(-1, 784), labels.long()))
    return splits[0], splits[1]


def split_validation(train, val_size, seed):
    """Hold out val_size seeded training images: (train Split, validation Split or None)."""
    if val_size == 0:
        return train, None
    if not 0 < val_size < len(train):
        raise ValueError(f"--val-size must be between 0 and {len(train) - 1}, got {val_size}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(order[val_size:]), train.subset(order[:val_size])


def epoch_order(n, generator):
    """The order DataLoader(dataset, shuffle=True, generator=generator) visits n samples in an epoch.

    The same draws keep our batches the tutorial's: the DataLoader's iterator first draws a 64-bit
    base seed (for workers), then its RandomSampler draws randperm(n); when the epoch is consumed the
    sampler runs on and draws one more, unused, randperm(n).
    """
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    order = torch.randperm(n, generator=generator)
    torch.randperm(n, generator=generator)
    return order


# ============================================================================= 3. the training step
def textbook_step(model, criterion, optimizer, x, labels):
    """One training step exactly as the tutorial writes it: the reference for every faster path."""
    loss = criterion(model(x), labels)
    optimizer.zero_grad()  # the gradients add up in .grad: clear the last step's before this backward
    loss.backward()
    optimizer.step()
    return loss.detach()  # not loss.item(): that would make the CPU wait for the GPU every step


# ============================================================================= 4. an epoch
class NonFiniteLoss(ArithmeticError):
    def __init__(self, step):
        super().__init__(f"the loss became non-finite at step {step}")
        self.step = step


@dataclass
class EpochResult:
    step_losses: torch.Tensor  # (steps,) each step's mean loss, in order
    batch_sizes: torch.Tensor  # (steps,)

    @property
    def mean_loss(self):
        return float((self.step_losses * self.batch_sizes).sum() / self.batch_sizes.sum())


def train_epoch(step, train, batches, log_interval=100, log=None, should_stop=None):
    """Run step(x, labels) over `train`, one batch of indices at a time; an EpochResult, or None if stopped.

    Losses stay on the device and are read every log_interval steps only, so the device never waits
    for the host; log(step_number, steps, mean loss since the last log) is called then. should_stop()
    is asked between steps (Ctrl-C). Raises NonFiniteLoss naming the first bad step.
    """
    labels = train.labels.index_select(0, torch.cat(batches)).split([len(b) for b in batches])  # gathered at once
    losses = []
    for index, batch in enumerate(batches):
        if should_stop is not None and should_stop():
            return None
        x = normalize(train.pixels.index_select(0, batch), train.scaling)  # 10x faster than pixels[batch] on the CPU
        losses.append(step(x, labels[index]))
        if (index + 1) % log_interval == 0 or index + 1 == len(batches):
            recent = torch.stack(losses[-(index % log_interval + 1) :])
            if not bool(recent.isfinite().all()):  # a host sync, once every log_interval steps
                raise NonFiniteLoss(len(losses) - len(recent) + int((~recent.isfinite()).nonzero()[0]) + 1)
            if log is not None and (index + 1) % log_interval == 0:
                log(index + 1, len(batches), float(recent.mean()))
    sizes = torch.tensor([float(len(batch)) for batch in batches], device=batches[0].device)
    return EpochResult(torch.stack(losses), sizes)


# ============================================================================= 5. evaluation
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
    """Yield (labels, logits) of `split`, batch_size samples at a time, with the model in eval mode
    (a Dropout that an edit added must not drop anything here); its mode is given back after."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), batch_size):
            rows = slice(start, start + batch_size)
            yield split.labels[rows], model(normalize(split.pixels[rows], split.scaling))
    finally:
        model.train(was_training)


def evaluate(model, split, batch_size=1000, classes=10):
    """Mean loss, accuracy and confusion matrix of `model` on `split`."""
    loss_sum = torch.zeros((), device=split.pixels.device)
    confusion = torch.zeros(classes * classes, dtype=torch.long, device=split.pixels.device)
    for labels, logits in logits_in_batches(model, split, batch_size):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        confusion += torch.bincount(labels * classes + logits.argmax(1), minlength=classes * classes)
    confusion = confusion.view(classes, classes).cpu()
    return Evaluation(float(loss_sum) / len(split), int(confusion.diag().sum()), len(split), confusion)


# ============================================================================= 6. Adam, by hand
def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, bias_correction=True):
    """One Adam step in place, written out to answer the tutorial's question about bias correction.

    m and v are running averages of the gradient and its square, started at zero, so early on they
    are biased toward zero: after one step m = (1 - beta1) g = 0.1 g and v = (1 - beta2) g^2 =
    0.001 g^2. Dividing by (1 - beta^t) undoes exactly that, and the first step moves each weight by
    lr. Without it (bias_correction=False) the step is lr * m / sqrt(v): 0.1 / sqrt(0.001) = 3.16
    times lr at t = 1. For any gradients the uncorrected update is the corrected one times
    (1 - beta1^t) / sqrt(1 - beta2^t) (exactly, with eps = 0): about 6.6x at t = 12, 3.2x at 100,
    1.28x at 938, falling to 1x only as beta2^t fades: an early boost (m's bias shrinks the step,
    v's enlarges it more, since beta2 > 1 - (1 - beta1)^2), the opposite of a warm-up.
    """
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
    if bias_correction:
        m_hat = exp_avg / (1 - beta1**step)  # m_t / (1 - beta1^t)
        v_hat = exp_avg_sq / (1 - beta2**step)  # v_t / (1 - beta2^t)
    else:
        m_hat, v_hat = exp_avg, exp_avg_sq
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class AdamByHand(torch.optim.Optimizer):
    """Adam through adam_update, with or without bias correction: the study's third optimizer.

    Slower than torch's Adam (a Python loop over the tensors); its state_dict has Adam's layout.
    With bias_correction=True it equals torch.optim.Adam up to rounding (tested).
    """

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, bias_correction=True):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0, "bias_correction": bias_correction}
        super().__init__(parameters, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    zeros = torch.zeros_like(parameter)
                    state.update(step=torch.zeros(()), exp_avg=zeros, exp_avg_sq=zeros.clone())
                state["step"] += 1
                settings = [group[key] for key in ("lr", "betas", "eps", "bias_correction")]
                adam_update(
                    parameter, parameter.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]), *settings
                )


if __name__ == "__main__":  # python mnist_mlp.py: the program in the docstring above, on one thread
    torch.set_num_threads(1)
    exec(__doc__.split("data/MNIST/raw/):\n")[1].replace("\n    ", "\n"))
