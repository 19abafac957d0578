"""The tutorial's MNIST multilayer perceptron: its model, data, training step, evaluation and files.

Read it top-down as the lesson: the model, the data, the training step as the textbook writes it,
the same step made fast (used only where it is proven equal), evaluation, and Adam by hand. After
the banner further down comes the plumbing: command-line helpers, devices, files, checkpoints.
train.py, evaluate.py, bench.py, plot.py and predict.py are thin wrappers around these functions.
Nothing runs at import time.
"""

import argparse
import contextlib
import gzip
import math
import os
import pickle
import pickletools
import shutil
import stat
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


# ============================================================================= 1. the model

class NoteModel(nn.Module):
    """784 -> 128 -> 64 -> 10 with ReLU between layers, as in the tutorial.

    Other hidden sizes give layers fc1 ... fcN; the defaults give exactly the tutorial's
    state_dict (keys and shapes), so weights move between the two. Edit forward() freely:
    train.py trains whatever it computes (see make_train_step).
    """

    def __init__(self, hidden=(128, 64)):
        super().__init__()
        sizes = [784, *hidden, 10]
        self.depth = len(sizes) - 1
        for number, (n_in, n_out) in enumerate(zip(sizes, sizes[1:]), start=1):
            setattr(self, f"fc{number}", nn.Linear(n_in, n_out))

    def forward(self, x):
        x = x.view(-1, 784)  # (N, 1, 28, 28) and (N, 784) both work
        for number in range(1, self.depth):
            x = F.relu(getattr(self, f"fc{number}")(x))
        return getattr(self, f"fc{self.depth}")(x)


# ============================================================================= 2. the data

# --dataset name -> (its folder under --data-dir, which is also torchvision's class name; class names)
DATASETS = {
    "mnist": ("MNIST", [str(digit) for digit in range(10)]),
    "fashion-mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}
RAW_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@dataclass
class Split:
    """One split of a dataset: raw pixels (N, 784) uint8 and labels (N,) int64, on one device.

    Keeping the pixels as bytes and normalizing each batch costs about 20 microseconds a step
    and saves the 4x memory of a float copy of the whole dataset.
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

    ToTensor gives p / 255 and Normalize (x - 0.5) / 0.5, which is p / 127.5 - 1. In float32 that
    one division rounds to the very bits of the three-step form for each of the 256 byte values
    (a test checks all of them), and it costs one pass over the batch instead of four.
    """
    return pixels.div(127.5).sub_(1)


def load_dataset(data_dir, dataset="mnist", download=True):
    """(train Split, test Split) on the CPU, read from data_dir/<Dataset>/raw/.

    The four IDX files are read by path (decompressing a .gz copy first), so no cache file of
    torchvision's can stand in for them. torchvision is asked only to download missing files.
    """
    folder = raw_folder(data_dir, dataset)
    if os.path.exists(data_dir) and not (os.path.isdir(data_dir) and os.access(data_dir, os.R_OK | os.X_OK)):
        raise UsageError(f"cannot read the data folder {data_dir}: not a readable folder")
    missing = [name for name in RAW_FILES if not prepare_raw_file(folder, name)]
    if missing and not download:
        raise UsageError(_missing_data_message(folder, dataset))
    if missing:
        download_raw_files(data_dir, dataset)
    splits = []
    for prefix in ("train", "t10k"):
        images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), ndim=3)
        labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), ndim=1)
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise UsageError(f"{folder}: expected N images of 28x28 and N labels, "
                             f"got images {tuple(images.shape)} and {len(labels)} labels")
        if len(labels) and int(labels.max()) > 9:
            raise UsageError(f"{folder}: labels must be 0..9")
        splits.append(Split(images.reshape(-1, 784), labels.long()))
    return splits[0], splits[1]


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


# ============================================================================= 3. the training step, as the textbook writes it

def textbook_step(model, criterion, optimizer, x, labels):
    """One training step exactly as the tutorial writes it: the reference for every faster path."""
    optimizer.zero_grad()
    loss = criterion(model(x), labels)
    loss.backward()
    optimizer.step()
    return loss.detach()  # not loss.item(): that would make the CPU wait for the GPU every step


# ============================================================================= 4. the same step, fast

class FastStep:
    """textbook_step for a plain stack of Linear layers with ReLU between and cross-entropy,
    with the backward pass written out beside the forward.

    It skips autograd's graph and bookkeeping and writes the gradients straight into the
    parameters' .grad tensors. Every kernel is the one autograd itself runs, so the loss and
    gradients are bit-identical to loss.backward()'s; make_train_step checks that on the model
    at hand before using it, since an edited forward() would not be seen here.
    """

    def __init__(self, linears, optimizer=None):
        self.layers = linears
        self.optimizer = optimizer
        self.one = torch.ones((), device=linears[0].weight.device)
        self.batch_sizes = {}  # batch size -> the same as a 0-d float tensor, made once

    @torch.no_grad()
    def forward_backward(self, x, labels, grads):
        """Loss and logits of the batch; writes dLoss/dW and dLoss/db into grads [(dW, db), ...]."""
        inputs = [x]  # each layer's input, kept for the backward pass
        for index, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias, x, layer.weight.t())     # y = x W^T + b  (what F.linear runs)
            if index < len(self.layers) - 1:
                x = x.relu_()                                    # h = max(y, 0), in place: y is not needed again
                inputs.append(x)
        log_probs = torch.log_softmax(x, dim=1)
        loss = F.nll_loss(log_probs, labels)                     # mean over the batch of -log p[label]

        # Backward, by the kernels autograd runs: d(loss)/d(log_probs) is -1/N at each label
        # (nll_loss_backward: reduction 1 = mean, -100 = the default ignore_index, total weight N),
        # and through log_softmax d(loss)/dy = (softmax(y) - onehot(label)) / N.
        batch_size = self.batch_sizes.get(len(labels))
        if batch_size is None:
            batch_size = self.batch_sizes[len(labels)] = self.one.new_full((), len(labels))
        grad = torch.ops.aten.nll_loss_backward(self.one, log_probs, labels, None, 1, -100, batch_size)
        grad = torch.ops.aten._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype)
        for index in reversed(range(len(self.layers))):
            weight, (weight_grad, bias_grad) = self.layers[index].weight, grads[index]
            torch.mm(grad.t(), inputs[index], out=weight_grad)   # dW = g^T x
            torch.sum(grad, dim=0, out=bias_grad)                # db = g summed over the batch
            if index > 0:                                        # dx = g W, passed where h > 0
                grad = torch.ops.aten.threshold_backward(grad.mm(weight), inputs[index], 0)
        return loss, x

    def __call__(self, x, labels):
        """One step; returns the batch's mean loss as a 0-d tensor, left on the device."""
        loss, _ = self.forward_backward(x, labels, [(layer.weight.grad, layer.bias.grad) for layer in self.layers])
        if isinstance(self.optimizer, FlatAdam) and self.optimizer.flat:
            self.optimizer.step_unhooked()  # the gradients were written straight into its flat buffer
        else:
            self.optimizer.step()
        return loss


def fast_step_problem(model, criterion, batch_size):
    """Why FastStep cannot train this model exactly, or None if it can.

    It can when the model is only a chain of nn.Linear layers, the loss is nn.CrossEntropyLoss()
    with its defaults, no hooks are registered, and on a probe batch the model's own forward()
    and autograd give bit-identical logits, loss and gradients to FastStep's. The probe leaves
    no trace: random generators, gradients and the model are as they were.
    """
    linears = list(model.children())
    if not linears or any(type(module) is not nn.Linear for module in model.modules() if module is not model):
        kinds = sorted({type(module).__name__ for module in model.modules() if module is not model} - {"Linear"})
        return f"the model has {', '.join(kinds) or 'no'} layers; the fast step knows only a chain of Linear layers"
    parameters = [parameter for layer in linears for parameter in (layer.weight, layer.bias)]
    if any(parameter is None for parameter in parameters) or len(parameters) != len(list(model.parameters())):
        return "the model has parameters other than its Linear layers' weights and biases"
    if any(True for _ in model.buffers()):
        return "the model has buffers"
    if any(parameter.dtype != torch.float32 or parameter.device != parameters[0].device or not parameter.requires_grad
           for parameter in parameters):
        return "the parameters are not all trainable float32 tensors on one device"
    if any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        return "the Linear layers do not form a chain"
    if _has_hooks(model, parameters):
        return "the model has hooks registered"
    if type(criterion) is not nn.CrossEntropyLoss or (criterion.weight, criterion.ignore_index, criterion.reduction,
                                                       criterion.label_smoothing) != (None, -100, "mean", 0.0):
        return "the loss is not nn.CrossEntropyLoss() with its defaults"

    device = parameters[0].device
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, linears[0].in_features, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, linears[-1].out_features, (batch_size,), generator=generator).to(device)
    grads = [(torch.empty_like(layer.weight), torch.empty_like(layer.bias)) for layer in linears]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a dropout in forward() draws
        try:
            fast_loss, fast_logits = FastStep(linears).forward_backward(x, labels, grads)
        except RuntimeError as error:
            return f"the fast step does not run on {device} ({_reason(error)})"
        with torch.enable_grad():
            logits = model(x)
            if logits.shape != fast_logits.shape:
                return "the model's forward() gives outputs of another shape than its Linear layers do"
            loss = criterion(logits, labels)
            autograd_grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    if not (torch.equal(logits, fast_logits) and torch.equal(loss, fast_loss)):
        return "the model's forward() computes something other than Linear layers with ReLU between"
    # On the CPU the kernels match bit for bit; a GPU library may pick another algorithm for a
    # transposed operand, which changes the last bits of a sum, so there the gradients need only
    # agree to float rounding (the logits and loss must still be identical).
    same = torch.equal if device.type == "cpu" else (lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-7))
    if not all(a is not None and same(a, b) for a, b in zip(autograd_grads, [g for pair in grads for g in pair])):
        return "the model's gradients differ from those of Linear layers with ReLU between"
    return None


def _has_hooks(model, parameters):
    from torch.nn.modules import module as module_globals  # where nn.Module keeps its global hooks

    global_hooks = [getattr(module_globals, name, None) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")]
    module_hooks = [getattr(module, name, None) for module in model.modules() for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]
    tensor_hooks = [getattr(parameter, name, None) for parameter in parameters
                    for name in ("_backward_hooks", "_post_accumulate_grad_hooks")]
    return any(bool(hooks) for hooks in global_hooks + module_hooks + tensor_hooks)


class FlatAdam(torch.optim.Adam):
    """torch.optim.Adam(fused=True) that steps with one fused-kernel call over flat buffers.

    The parameters, their gradients and Adam's m and v each live in one contiguous buffer that
    the model's parameters, their .grad and the optimizer's state are views of. Adam is
    elementwise, so one call over the buffers computes what torch's fused Adam computes tensor by
    tensor, bit for bit (tested), without its ~100 microseconds of per-step Python. state_dict()
    and load_state_dict() are Adam's own, so checkpoints load into torch.optim.Adam and back.
    """

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0):
        parameters = list(parameters)
        super().__init__(parameters, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self.flat_params = torch.cat([parameter.detach().reshape(-1) for parameter in parameters])
        self.flat_grads = torch.zeros_like(self.flat_params)
        sizes = [parameter.numel() for parameter in parameters]
        with torch.no_grad():
            for parameter, param_view, grad_view in zip(parameters, self.flat_params.split(sizes),
                                                        self.flat_grads.split(sizes)):
                parameter.data = param_view.view_as(parameter)
                parameter.grad = grad_view.view_as(parameter)
        self._grad_views = [parameter.grad for parameter in parameters]
        self._bind_state()

    def _bind_state(self):
        """Put m, v and the step count of every parameter into the flat buffers (views)."""
        parameters = self.param_groups[0]["params"]
        sizes = [parameter.numel() for parameter in parameters]
        self.flat_exp_avg = torch.zeros_like(self.flat_params)
        self.flat_exp_avg_sq = torch.zeros_like(self.flat_params)
        steps = {float(self.state[parameter]["step"]) for parameter in parameters if "step" in self.state[parameter]}
        self.flat_steps = torch.zeros(len(parameters), device=self.flat_params.device)
        for parameter, step, m_view, v_view in zip(parameters, self.flat_steps, self.flat_exp_avg.split(sizes),
                                                   self.flat_exp_avg_sq.split(sizes)):
            state = self.state[parameter]
            if state:
                step.copy_(state["step"])
                m_view.copy_(state["exp_avg"].reshape(-1))
                v_view.copy_(state["exp_avg_sq"].reshape(-1))
            state.update(step=step, exp_avg=m_view.view_as(parameter), exp_avg_sq=v_view.view_as(parameter))
        self._step_views = list(self.flat_steps.unbind())
        self._exp_avg_views = [self.state[parameter]["exp_avg"] for parameter in parameters]
        self._exp_avg_sq_views = [self.state[parameter]["exp_avg_sq"] for parameter in parameters]
        self._one = torch.ones((), device=self.flat_steps.device)
        # One call serves all parameters only while they share one step count.
        self.flat = len(self.param_groups) == 1 and len(steps) <= 1 and not self.param_groups[0]["amsgrad"]

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._bind_state()

    def zero_grad(self, set_to_none=True):
        """As torch's (set_to_none: .grad becomes None), minus its per-call profiler label."""
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for parameter in self.param_groups[0]["params"]:
            parameter.grad = None
        return None

    @torch.no_grad()
    def step(self, closure=None):
        parameters = self.param_groups[0]["params"]
        grads = [parameter.grad for parameter in parameters]
        if closure is not None or not self.flat or any(grad is None for grad in grads):
            self.flat = False  # a parameter without a gradient is skipped by Adam: the step counts part ways
            return super().step(closure)
        if all(grad is view for grad, view in zip(grads, self._grad_views)):
            self.step_unhooked()
        else:  # autograd made new .grad tensors: one call over the per-parameter views, as torch makes it
            self.flat_steps.add_(self._one)
            self._fused_adam(parameters, grads, self._exp_avg_views,
                             self._exp_avg_sq_views, self._step_views)
        return None

    def step_unhooked(self):
        """step() for gradients already in the flat buffer, without torch.optim's per-call hooks and
        profiler label (about 30 microseconds): FastStep writes its gradients there itself."""
        self.flat_steps.add_(self._one)
        self._fused_adam([self.flat_params], [self.flat_grads], [self.flat_exp_avg], [self.flat_exp_avg_sq],
                         [self._step_views[0]])

    def _fused_adam(self, params, grads, exp_avgs, exp_avg_sqs, steps):
        group = self.param_groups[0]
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=group["lr"],
                           beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                           eps=group["eps"], amsgrad=False, maximize=False)


def make_optimizer(name, parameters, lr, momentum=0.9, fused=True):
    """Adam (the tutorial's), SGD, or adam-no-bias-correction (AdamByHand, for the study).

    fused=True takes the one-kernel version where it works here.
    Fused Adam computes the same update as the default for-loop Adam, with different rounding
    in the last bit; fused SGD is bit-identical to the default. Whether a fused kernel works on
    this device and torch is found by running one step on a scratch tensor: some torch versions
    accept fused=True and fail only at the first step.
    """
    parameters = list(parameters)
    if name == "adam-no-bias-correction":
        return AdamByHand(parameters, lr=lr, bias_correction=False)
    if name == "adam":
        candidates = [(FlatAdam, {}), (torch.optim.Adam, {"fused": True})] if fused else []
        candidates.append((torch.optim.Adam, {}))
        options = {"lr": lr}
    else:
        candidates = [(torch.optim.SGD, {"fused": True})] if fused else []
        candidates.append((torch.optim.SGD, {}))
        options = {"lr": lr, "momentum": momentum}
    device = parameters[0].device if parameters else torch.device("cpu")
    for optimizer_class, extra in candidates[:-1]:
        if _optimizer_works(optimizer_class, device, **options, **extra):
            return optimizer_class(parameters, **options, **extra)
    optimizer_class, extra = candidates[-1]
    return optimizer_class(parameters, **options, **extra)


def _optimizer_works(optimizer_class, device, **options):
    scratch = nn.Parameter(torch.zeros(3, device=device))
    try:
        optimizer = optimizer_class([scratch], **options)
        scratch.grad = torch.ones_like(scratch)
        optimizer.step()
        return bool(torch.isfinite(scratch).all())
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False


def optimizer_config(optimizer):
    """The hyper-parameters that rebuild `optimizer`: plain values for the checkpoint."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        name = "sgd"
    else:
        name = "adam-no-bias-correction" if group.get("bias_correction") is False else "adam"
    keys = ("lr", "momentum", "weight_decay") if name == "sgd" else ("lr", "betas", "eps", "weight_decay")
    config = {key: group[key] for key in keys}
    if "betas" in config:
        config["betas"] = list(config["betas"])
    return {"optimizer": name, **config}


class CudaGraphStep:
    """FastStep and its FlatAdam update captured once in a CUDA graph, then replayed each step.

    A step of this small model is ~40 tiny kernels, each costing more to launch than to run;
    a replay launches them all at once. The batch is copied into fixed input buffers first,
    and a batch of another size (an epoch's short last one) runs FastStep directly.
    """

    def __init__(self, fast_step, batch_size, in_features):
        device = fast_step.layers[0].weight.device
        self.fast_step = fast_step
        self.x = torch.zeros(batch_size, in_features, device=device)
        self.labels = torch.zeros(batch_size, dtype=torch.long, device=device)
        grads = [(layer.weight.grad, layer.bias.grad) for layer in fast_step.layers]
        # Warm up on a side stream (cuBLAS sets up its workspace outside the capture); this
        # writes only the gradients, which every step overwrites.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fast_step.forward_backward(self.x, self.labels, grads)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # recorded, not run: no weight moves here
            self.loss, _ = fast_step.forward_backward(self.x, self.labels, grads)
            fast_step.optimizer.step_unhooked()

    def __call__(self, x, labels):
        if len(labels) != len(self.labels):
            return self.fast_step(x, labels)
        self.x.copy_(x)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.clone()  # the graph rewrites its loss tensor at the next replay


def make_train_step(model, criterion, optimizer, choice="auto", batch_size=64, cuda_graph=False):
    """(step, description): the step train.py runs, step(x, labels) -> the batch's loss.

    "autograd" is textbook_step. "fast" is FastStep, allowed only where fast_step_problem finds
    none; "auto" takes FastStep where it is proven equal and textbook_step elsewhere, and the
    description says which and why, so an edited model is never silently trained as another.
    cuda_graph=True replays the fast step as a CUDA graph (CudaGraphStep) where the model is
    on CUDA and the optimizer is FlatAdam; the description says when it cannot.
    """
    problem = None if choice == "autograd" else fast_step_problem(model, criterion, batch_size)
    if choice == "fast" and problem is not None:
        raise UsageError(f"--step fast cannot train this model exactly: {problem}; use --step auto or autograd")
    if choice == "autograd" or problem is not None:
        reason = "as asked" if choice == "autograd" else problem
        on_cuda = next(model.parameters()).device.type == "cuda"
        graph = "; not as a CUDA graph, which only the fast step can be" if cuda_graph and on_cuda else ""
        return (lambda x, labels: textbook_step(model, criterion, optimizer, x, labels),
                f"autograd step ({reason}{graph})")
    linears = list(model.children())
    for layer in linears:
        for parameter in (layer.weight, layer.bias):
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    step = FastStep(linears, optimizer)
    description = "fast step (hand-written backward, checked equal to autograd on this model)"
    if cuda_graph and linears[0].weight.device.type == "cuda":
        if isinstance(optimizer, FlatAdam) and optimizer.flat:
            step = CudaGraphStep(step, batch_size, linears[0].in_features)
            description += ", replayed as a CUDA graph"
        else:
            description += "; not as a CUDA graph, which needs the fused Adam"
    return step, description


# ============================================================================= 5. an epoch of training

@contextlib.contextmanager
def denormals_flushed():
    """Treat denormal floats as zero on the CPU inside the block, as it was before after it.

    Adam's m for border pixels that are almost always 0 shrinks by 0.9 a step and becomes
    denormal after about two epochs; x86 computes on denormals many times slower, which made
    later epochs 40% slower than the first. A denormal m moves its weight by far less than one
    ulp, so the weights stay bit-identical (a test trains two real epochs both ways).
    """
    before = denormals_are_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def denormals_are_flushed():
    """torch has a setter for flushing denormals and no getter: ask the arithmetic instead."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0  # 1e-39 is denormal in float32


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
    batches = order.split(batch_size)
    labels = train.labels.index_select(0, order).split(batch_size)  # the epoch's labels, gathered at once
    steps = len(batches)
    losses = []
    for step_index in range(steps):
        if should_stop is not None and should_stop():
            return None
        # index_select is the cheapest gather: 10x faster than pixels[batch] on the CPU.
        x = normalize(train.pixels.index_select(0, batches[step_index]))
        losses.append(step(x, labels[step_index]))
        if (step_index + 1) % log_interval == 0 or step_index + 1 == steps:
            recent = torch.stack(losses[-(step_index % log_interval + 1):])
            if not bool(recent.isfinite().all()):  # a host sync, once every log_interval steps
                first_bad = len(losses) - len(recent) + int((~recent.isfinite()).nonzero()[0]) + 1
                raise NonFiniteLoss(first_bad)
            if log is not None and (step_index + 1) % log_interval == 0:
                log(step_index + 1, steps, float(recent.mean()))
    sizes = torch.full((steps,), float(batch_size), device=order.device)
    sizes[-1] = len(order) - (steps - 1) * batch_size
    return EpochResult(torch.stack(losses), sizes)


def all_finite(tensors):
    """True if no tensor in `tensors` (any nesting of dicts and lists) holds a NaN or infinity."""
    if isinstance(tensors, torch.Tensor):
        return not tensors.is_floating_point() or bool(torch.isfinite(tensors).all())
    if isinstance(tensors, dict):
        return all(all_finite(value) for value in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return all(all_finite(value) for value in tensors)
    return not isinstance(tensors, float) or math.isfinite(tensors)


# ============================================================================= 6. evaluation

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
    """Yield (labels, logits) for `split`, batch_size samples at a time, in order, with the model in
    eval mode (a Dropout an edit added must not drop anything here); its mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(split), batch_size):
            yield split.labels[start:start + batch_size], model(normalize(split.pixels[start:start + batch_size]))
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model, split, batch_size=1000, classes=10):
    """Mean loss, accuracy and confusion matrix of `model` on `split` (in eval mode)."""
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


# ============================================================================= 7. Adam, by hand

def adam_update(param, grad, exp_avg, exp_avg_sq, step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                bias_correction=True):
    """One Adam step in place, written out to answer the tutorial's question about bias correction.

    m and v are running averages of the gradient and its square, started at zero, so early on
    they are biased toward zero: after one step m = (1 - beta1) g = 0.1 g and
    v = (1 - beta2) g^2 = 0.001 g^2. Dividing by (1 - beta^t) undoes exactly that, and the first
    step moves each weight by lr. Without it (bias_correction=False) the step is
    lr * m / sqrt(v): 0.1 / sqrt(0.001) = 3.16 times lr at t = 1, and for a steady gradient about
    6.5x at t = 10, 3.2x at t = 100, 1.26x at t = 1000, falling to 1x only as beta2^t fades.
    The uncorrected early steps are too large, the reason the Adam paper gives for the correction.
    """
    beta1, beta2 = betas
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)                    # m_t
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)       # v_t
    if bias_correction:
        m_hat = exp_avg / (1 - beta1 ** step)                          # m_t / (1 - beta1^t)
        v_hat = exp_avg_sq / (1 - beta2 ** step)                       # v_t / (1 - beta2^t)
    else:
        m_hat, v_hat = exp_avg, exp_avg_sq
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


class AdamByHand(torch.optim.Optimizer):
    """Adam through adam_update, with or without bias correction: the study's third optimizer.

    Slower than torch's Adam (a Python loop over the tensors); its state_dict has Adam's layout.
    With bias_correction=True it equals torch.optim.Adam up to rounding (tested).
    """

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, bias_correction=True):
        super().__init__(parameters, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": 0,
                                      "bias_correction": bias_correction})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                state = self.state[parameter]
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(parameter),
                                 exp_avg_sq=torch.zeros_like(parameter))
                state["step"] += 1
                adam_update(parameter, parameter.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"]),
                            group["lr"], group["betas"], group["eps"], group["bias_correction"])


# ============================================================================= 8. your own handwriting

def digit_pixels(image):
    """A PIL image of one handwritten digit, prepared as MNIST's digits were: (28, 28) uint8.

    MNIST digits are light ink on black, scaled so the longer side of the ink is 20 pixels
    (aspect ratio kept), and placed in the 28x28 frame so the ink's centre of mass is at the
    centre. A photo or drawing is usually dark ink on light paper, of any size, off centre:
    this inverts it if its border is light, lifts the paper to black (transparent counts as
    paper), crops the ink with a margin that ignores specks and shadows, scales and centres it.
    A 28x28 image that is already light on dark passes through unchanged. ValueError if the
    image holds no ink.
    """
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)  # phone photos store their rotation apart
    gray = _grayscale(image)
    if gray.shape == (28, 28) and _border(gray).median() < 0.25:  # already MNIST-style
        return (gray * 255).round().to(torch.uint8) if image.mode != "L" else \
            torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(28, 28)
    if max(gray.shape) > 600:  # a photo: work at a size where a stroke is still several pixels wide
        scale = 600 / max(gray.shape)
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
    return (_centre_by_mass(crop) * 255).round().to(torch.uint8)


def _grayscale(image):
    """The image as a float tensor (H, W) in [0, 1]; transparent pixels become white paper."""
    from PIL import Image

    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit and float images
        values = _from_pil(image.convert("F"))
        return (values / (65535.0 if float(values.max()) > 255 else 255.0)).clamp(0, 1)
    if "A" in image.mode or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return _from_pil(image.convert("L").convert("F")) / 255.0


def _from_pil(image):
    """A PIL "F" image as a float32 tensor (H, W)."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.float32).view(image.height, image.width)


def _resize(values, height, width):
    """Resize a float tensor (H, W) with PIL's Lanczos filter, which averages over the pixels it shrinks."""
    from PIL import Image

    image = Image.frombytes("F", (values.shape[1], values.shape[0]), values.float().contiguous().numpy().tobytes())
    return _from_pil(image.resize((width, height), Image.Resampling.LANCZOS))


def _border(values):
    """The pixels of the outer 5% frame of a (H, W) tensor."""
    height, width = values.shape
    band = max(1, round(0.05 * min(height, width)))
    return torch.cat([values[:band].flatten(), values[-band:].flatten(),
                      values[:, :band].flatten(), values[:, -band:].flatten()])


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
    frame[top:top + height, left:left + width] = digit
    return frame


# #############################################################################################
# Plumbing: command-line helpers, devices, files, raw data files, checkpoints.
# Nothing above needs to be read to follow the lesson; everything below serves the scripts.
# #############################################################################################

class UsageError(Exception):
    """Bad input from the user: the scripts print `error: <message>` and exit with code 2."""


# ----------------------------------------------------------------------------- command lines

def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None


def bounded_int(low, high):
    """An argparse type: a whole number from low to high (inclusive)."""
    def parse(text):
        value = _integer(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {text}")
        return value
    parse.__name__ = "int"
    return parse


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def positive_float(text):
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text):
    """A number from 0 up to (not including) 1: SGD's momentum."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one `error:` line (exit code 2), without the usage dump."""

    def error(self, message):
        raise UsageError(message)


# ----------------------------------------------------------------------------- devices

def _mps_available():
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


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

def _umask():
    mask = os.umask(0o022)  # the only way to read the umask is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call write(file) on a temp file beside `path`, then rename it over `path`.

    A crash at any moment leaves either the old file or the complete new one, never a half.
    The file gets the permissions a plain open() would give it (0666 less the umask).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp_path)
        raise


def is_regular_file(path):
    """True for a regular file (or a link to one); False for a folder, FIFO, device or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _reason(error, limit=300):
    """An exception as one short line for an `error:` message."""
    text = " ".join(str(error).split()) or "no details"
    if "WeightsUnpickler error:" in text:  # torch.load's long advice; keep the part that says why
        text = text.split("WeightsUnpickler error:", 1)[1].strip()
    return f"{type(error).__name__}: {text[:limit]}"


# ----------------------------------------------------------------------------- raw data files

def raw_folder(data_dir, dataset):
    return os.path.join(data_dir, DATASETS[dataset][0], "raw")


def prepare_raw_file(folder, name):
    """True once folder/name is a valid IDX file, gunzipping folder/name.gz if needed; False if absent.

    torchvision's downloader would not take our .gz copies (their checksums differ from the
    ones it expects), so we decompress them: to a temp file, checked, then renamed. A broken
    decompressed file is replaced from its .gz, so a fixed .gz heals it.
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
            shutil.copyfileobj(compressed, file, 1 << 20)
        file.flush()
        _check_idx_header(os.pread(file.fileno(), 4 + 4 * ndim, 0), os.fstat(file.fileno()).st_size, ndim, packed)

    try:
        atomic_write(path, gunzip)
    except (OSError, EOFError, zlib.error) as error:  # BadGzipFile is an OSError
        raise UsageError(f"cannot decompress {packed} ({_reason(error)})") from None
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
    return _check_idx_header(header, os.path.getsize(path), ndim, path)


def _check_idx_header(header, size, ndim, shown_name):
    """The dimensions an IDX header promises, checked against the file's size."""
    if len(header) < 4 + 4 * ndim:
        raise UsageError(f"{shown_name} is truncated: not an IDX file")
    magic, *dims = struct.unpack(f">{1 + ndim}I", header)
    if magic != 0x800 + ndim:
        raise UsageError(f"{shown_name} is not an IDX file of {ndim}-D bytes (magic {magic:#010x}, "
                         f"expected {0x800 + ndim:#010x})")
    expected_size = len(header) + math.prod(dims)
    if size != expected_size:
        raise UsageError(f"{shown_name} has {size} bytes, its header promises {expected_size}: truncated or corrupt")
    return dims


def read_idx(path, ndim):
    """The uint8 tensor in an IDX file (checked first), read by its path."""
    dims = check_idx_file(path, ndim)
    data = bytearray(os.path.getsize(path))  # read straight into the buffer the tensor will use: one copy
    with open(path, "rb") as file:
        file.readinto(data)
    return torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim).view(*dims)


def download_raw_files(data_dir, dataset):
    """Ask torchvision to download the four raw files into data_dir/<Dataset>/raw/."""
    from torchvision import datasets  # imported here: only a download needs it

    folder = raw_folder(data_dir, dataset)
    try:
        getattr(datasets, DATASETS[dataset][0])(data_dir, train=True, download=True)
    except Exception as error:  # torchvision raises many kinds: offline, corrupt, permissions
        raise UsageError(f"{_missing_data_message(folder, dataset)} (download failed: {_reason(error)})") from None
    missing = [name for name in RAW_FILES if not prepare_raw_file(folder, name)]
    if missing:
        raise UsageError(f"{_missing_data_message(folder, dataset)} (the download left out {', '.join(missing)})")


def _missing_data_message(folder, dataset):
    return (f"{dataset} data not found: put {', '.join(RAW_FILES)} (or their .gz) into {folder}, "
            "or point --data-dir at a folder that has them")


# ----------------------------------------------------------------------------- checkpoints

MAX_HIDDEN = 1 << 16  # units in one hidden layer that a checkpoint may ask for
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
    copy = plain_copy(checkpoint)
    atomic_write(path, lambda file: torch.save(copy, file))


def pickle_globals(path):
    """The module.name of every class or function that unpickling the file would import.

    Read from the pickle's opcodes without running any of it: torch.load's own message about a
    refused import is worded differently from one torch version to the next.
    """
    import zipfile

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


def load_checkpoint(path, map_location="cpu", trust_pickle=False):
    """Read a checkpoint safely: our dict, a bare state_dict, or (trust_pickle) a pickled model.

    Always returns our dict format, checked (types, sizes, ranges) before anything is built
    from it; for a bare state_dict or a pickled model, `epoch` is 0 and the config holds only
    the hidden sizes.
    """
    if not os.path.lexists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder, not a checkpoint file")
    if not is_regular_file(path):
        raise UsageError(f"{path} is not a regular file (a pipe or a device?)")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{path}: permission denied")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        unsafe = [name for name in pickle_globals(path) if name not in WEIGHTS_ONLY_GLOBALS
                  and (not name.startswith("torch.") or name.startswith("torch.nn."))]
        if not unsafe:
            raise UsageError(f"{path} is not a readable checkpoint ({_reason(error)})") from None
        if not trust_pickle:
            if any(name.startswith(("__main__.", "torch.nn.")) for name in unsafe):
                raise UsageError(f"{path} is a pickled model (torch.save(model, ...)); loading it runs code "
                                 "from the file: pass --trust-pickle if you trust where it came from") from None
            raise UsageError(f"{path} is refused: loading it would run {unsafe[0]} (unsafe pickle); "
                             "pass --trust-pickle only if you trust where it came from") from None
        print(f"warning: --trust-pickle: loading {path} runs code from the file", file=sys.stderr)
        try:
            data = _load_trusting_pickle(path, map_location)
        except Exception as trusted_error:
            raise UsageError(f"{path} cannot be loaded even with --trust-pickle ({_reason(trusted_error)})") from None
    return checked_checkpoint(path, data)


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


def checked_checkpoint(path, data):
    """`data` from a checkpoint file as our dict, or a one-line UsageError saying what is wrong.

    Every field is checked before anything is built from it: a small file must not be able to
    make us allocate gigabytes (stride-0 tensors, a huge `hidden`) or crash with a traceback.
    """
    if isinstance(data, nn.Module):
        data = data.state_dict()
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        checkpoint = dict(data)
    elif isinstance(data, dict) and data and all(isinstance(value, torch.Tensor) for value in data.values()):
        checkpoint = {"model": data}
    else:
        raise UsageError(f"{path} holds no model weights (expected a checkpoint or a state_dict)")
    hidden = _checked_state_dict(path, checkpoint["model"])
    config = checkpoint.setdefault("config", {})
    if not isinstance(config, dict):
        raise UsageError(f"{path}: its config is a {type(config).__name__}, not a dict")
    config = checkpoint["config"] = dict(config)
    if "hidden" in config and not (isinstance(config["hidden"], (list, tuple)) and list(config["hidden"]) == hidden):
        raise UsageError(f"{path}: its config says hidden sizes {config['hidden']!r}, its weights have {hidden}")
    config["hidden"] = hidden
    epoch = checkpoint.setdefault("epoch", 0)
    if type(epoch) is not int or not 0 <= epoch <= 1_000_000:
        raise UsageError(f"{path}: its epoch is {epoch!r}, not a whole number from 0 to 1,000,000")
    if config.get("dataset", "mnist") not in DATASETS:
        raise UsageError(f"{path}: unknown dataset {config['dataset']!r} (known: {', '.join(DATASETS)})")
    for key in ("val_size", "seed", "batch_size"):
        if key in config and (type(config[key]) is not int or config[key] < 0):
            raise UsageError(f"{path}: its config's {key} is {config[key]!r}, not a whole number of 0 or more")
    if config.get("val_size") and "seed" not in config:
        raise UsageError(f"{path}: it held out {config['val_size']} validation images but records no seed")
    if "metrics" in checkpoint and not isinstance(checkpoint["metrics"], dict):
        raise UsageError(f"{path}: its metrics entry is not a dict")
    return checkpoint


def _checked_state_dict(path, state):
    """The hidden sizes of a NoteModel state_dict, after checking its names, shapes and storage."""
    depth = len(state) // 2
    expected = [f"fc{number}.{kind}" for number in range(1, depth + 1) for kind in ("weight", "bias")]
    if depth == 0 or list(state) != expected:
        names = ", ".join(map(str, list(state)[:6]))
        raise UsageError(f"{path}: its weights are named {names}, not fc1.weight, fc1.bias, ... as in NoteModel")
    sizes = [784]
    for number in range(1, depth + 1):
        weight, bias = state[f"fc{number}.weight"], state[f"fc{number}.bias"]
        for name, tensor in ((f"fc{number}.weight", weight), (f"fc{number}.bias", bias)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.layout != torch.strided:
                raise UsageError(f"{path}: {name} is not a dense floating-point tensor")
            if tensor.untyped_storage().nbytes() < tensor.numel() * tensor.element_size():
                raise UsageError(f"{path}: {name} claims {tensor.numel():,} values but stores fewer "
                                 "(a stride trick); refused")
        if weight.dim() != 2 or bias.dim() != 1 or weight.shape[1] != sizes[-1] or bias.shape[0] != weight.shape[0]:
            raise UsageError(f"{path} does not fit a NoteModel: fc{number}.weight is {list(weight.shape)} and "
                             f"fc{number}.bias {list(bias.shape)}, where the input has {sizes[-1]} values")
        sizes.append(weight.shape[0])
    if not all_finite(state):
        raise UsageError(f"{path}: its weights hold NaN or infinity (the run that wrote it diverged)")
    if sizes[-1] != 10:
        raise UsageError(f"{path} does not fit a NoteModel: its last layer has {sizes[-1]} outputs, not 10")
    if any(not 1 <= size <= MAX_HIDDEN for size in sizes[1:-1]):
        raise UsageError(f"{path}: hidden sizes {sizes[1:-1]} are outside 1..{MAX_HIDDEN}")
    return sizes[1:-1]


def model_from_checkpoint(path, checkpoint, device="cpu"):
    """The NoteModel a checked checkpoint describes, with its weights, on `device`."""
    model = NoteModel(checkpoint["config"]["hidden"])
    model.load_state_dict(checkpoint["model"])  # names and shapes were checked in checked_checkpoint
    return model.to(device)
