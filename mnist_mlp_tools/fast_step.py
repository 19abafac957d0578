"""The training step made fast, used only where it is proven equal to mnist_mlp.textbook_step with torch's
optimizer: FastStep writes the backward pass out beside the forward; FlatAdam and FlatSGD keep the parameters,
gradients and state in flat buffers, each updated by one call; denormals_flushed keeps x86 from slowing down on
tiny numbers. make_training chooses the step and its optimizer together, and says which and why.
"""

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

import mnist_mlp

from . import optimizers
from .commands import UsageError, error_text


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
        x = x.reshape(len(x), -1)  # (N, 1, 28, 28) images to (N, 784) rows: a view, no copy
        inputs = [x]  # each layer's input, kept for the backward pass
        for index, layer in enumerate(self.layers):
            x = torch.addmm(layer.bias, x, layer.weight.t())  # y = x W^T + b  (what F.linear runs)
            if index < len(self.layers) - 1:
                x = x.relu_()  # h = max(y, 0), in place: y is not needed again
                inputs.append(x)
        log_probs = torch.log_softmax(x, dim=1)
        loss = F.nll_loss(log_probs, labels)  # mean over the batch of -log p[label]

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
            torch.mm(grad.t(), inputs[index], out=weight_grad)  # dW = g^T x
            torch.sum(grad, dim=0, out=bias_grad)  # db = g summed over the batch
            if index > 0:  # dx = g W, passed where h > 0
                grad = torch.ops.aten.threshold_backward(grad.mm(weight), inputs[index], 0)
        return loss, x

    def __call__(self, x, labels):
        """One step; returns the batch's mean loss as a 0-d tensor, left on the device."""
        loss, _ = self.forward_backward(x, labels, [(layer.weight.grad, layer.bias.grad) for layer in self.layers])
        self.optimizer.step()
        return loss


def fast_step_problem(model, criterion, batch_sizes):
    """Why FastStep cannot train this model exactly, or None if it can.

    It can when the model is only a chain of nn.Linear layers, the loss is nn.CrossEntropyLoss()
    with its defaults, no hooks are registered, and on a probe batch of each of the run's batch
    sizes, on the threads it runs on and into the gradient buffers it writes, the model's own forward()
    and autograd give bit-identical logits, loss and gradients to FastStep's: a matrix library may
    split a product differently by its shape, thread count and output address. The probe leaves no
    trace: random generators, gradients and the model are as they were.
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
    if any(
        parameter.dtype != torch.float32 or parameter.device != parameters[0].device or not parameter.requires_grad
        for parameter in parameters
    ):
        return "the parameters are not all trainable float32 tensors on one device"
    if any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        return "the Linear layers do not form a chain"
    if _has_hooks(model, parameters):
        return "the model has hooks registered"
    if type(criterion) is not nn.CrossEntropyLoss or (
        criterion.weight,
        criterion.ignore_index,
        criterion.reduction,
        criterion.label_smoothing,
    ) != (None, -100, "mean", 0.0):
        return "the loss is not nn.CrossEntropyLoss() with its defaults"

    for batch_size in sorted(set(batch_sizes)):
        problem = _probe(model, criterion, linears, parameters, batch_size)
        if problem is not None:
            return problem
    return None


def _probe(model, criterion, linears, parameters, batch_size):
    """fast_step_problem's comparison of FastStep with autograd on one random batch of batch_size rows."""
    device = parameters[0].device
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, linears[0].in_features, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, linears[-1].out_features, (batch_size,), generator=generator).to(device)
    # written where the run's step writes them (an optimizer's flat buffer), given back after: where a
    # product's bits depend on its output's address, the proof must be made at that address
    grads = [
        tuple(torch.empty_like(p) if p.grad is None else p.grad for p in (layer.weight, layer.bias))
        for layer in linears
    ]
    saved = [gradient.clone() for pair in grads for gradient in pair]
    try:
        return _compare(model, criterion, x, labels, grads)
    finally:
        with torch.no_grad():
            for gradient, value in zip([g for pair in grads for g in pair], saved):
                gradient.copy_(value)


def _compare(model, criterion, x, labels, grads):
    """FastStep's logits, loss and gradients (written into grads) against the model's and autograd's."""
    linears, device = list(model.children()), x.device
    parameters = [parameter for layer in linears for parameter in (layer.weight, layer.bias)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a dropout in forward() draws
        try:
            fast_loss, fast_logits = FastStep(linears).forward_backward(x, labels, grads)
        except RuntimeError as error:
            return f"the fast step does not run on {device} ({error_text(error)})"
        with torch.enable_grad():
            try:
                logits = model(x)
            except Exception as error:  # a forward() written for other inputs: the textbook step's to meet
                return f"the model's forward() does not take rows of {linears[0].in_features} ({error_text(error)})"
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
        return (
            f"the model's gradients differ from those of Linear layers with ReLU between (at batch {len(labels)}, "
            f"{torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)})"
        )
    return None


def _has_hooks(model, parameters):
    module_globals = torch.nn.modules.module  # where nn.Module keeps its global hooks
    global_hooks = [
        getattr(module_globals, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    ]
    module_hooks = [
        getattr(module, name, None)
        for module in model.modules()
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    ]
    tensor_hooks = [
        getattr(parameter, name, None)
        for parameter in parameters
        for name in ("_backward_hooks", "_post_accumulate_grad_hooks")
    ]
    return any(bool(hooks) for hooks in global_hooks + module_hooks + tensor_hooks)


# ----------------------------------------------------------------------------- optimizers over flat buffers


def adam_elementwise(params, grads, exp_avgs, exp_avg_sqs, step, group):
    """The tensor operations of torch.optim.Adam's default for-loop step (torch/optim/adam.py,
    _single_tensor_adam, without weight decay or amsgrad), in its order, on one set of tensors."""
    beta1, beta2 = group["betas"]
    exp_avgs.lerp_(grads, 1 - beta1)
    exp_avg_sqs.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (exp_avg_sqs.sqrt() / bias_correction2**0.5).add_(group["eps"])
    params.addcdiv_(exp_avgs, denom, value=-(group["lr"] / bias_correction1))


def sgd_elementwise(params, grads, momentum_buffers, step, group):
    """The tensor operations of torch.optim.SGD's default for-loop step (torch/optim/sgd.py,
    _single_tensor_sgd, without weight decay or nesterov), in its order: at step 1 the momentum
    buffer starts as a copy of the gradient, as torch's clone does."""
    if group["momentum"] != 0:
        if step == 1:
            momentum_buffers.copy_(grads)
        else:
            momentum_buffers.mul_(group["momentum"]).add_(grads, alpha=1 - group["dampening"])
        grads = momentum_buffers
    params.add_(grads, alpha=-group["lr"])


@functools.lru_cache(maxsize=None)
def elementwise_is_position_independent(update, device):
    """True if each of update's kernels (adam_elementwise or sgd_elementwise) gives an element the
    same bits wherever it sits.

    Run over one flat buffer, an element of a small tensor lands in the kernel's vectorised body
    where on its own it fell into the scalar tail (or in another thread's share). The two paths may
    round differently (a fused multiply-add in one of them), so this asks the kernels on this
    machine: every element computed alone, then all of them in one call.
    """
    generator = torch.Generator().manual_seed(0)
    n = 4 * 64 + 13  # bodies of every vector width up to 512 bits, and a tail
    tensors = [torch.randn(n, generator=generator) * scale for scale in (5e-2, 1e-3, 1e-4)]
    tensors.append(torch.rand(n, generator=generator) * 1e-6)
    params, grads, first, second = [tensor.to(device) for tensor in tensors]
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-3, "momentum": 0.9, "dampening": 0}
    states = [first, second] if update is adam_elementwise else [first]
    whole = [tensor.clone() for tensor in (params, *states)]
    update(whole[0], grads, *whole[1:], 7, group)
    alone = [tensor.clone() for tensor in (params, *states)]
    for i in range(n):
        update(alone[0][i : i + 1], grads[i : i + 1], *[tensor[i : i + 1] for tensor in alone[1:]], 7, group)
    return all(torch.equal(a, b) for a, b in zip(whole, alone))


def torch_defaults(optimizer_class):
    """The hyper-parameters torch.optim's class puts in a param group, with its default values."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(optimizer_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


ALIGNMENT = 64  # floats: 256 bytes, the most that torch aligns a new tensor to (CUDA's allocator)


class FlatOptimizer:
    """A torch.optim optimizer's arithmetic and state_dict layout over flat buffers: the parameters,
    gradients and each state tensor live in one contiguous buffer, updated by one call over the whole
    buffer instead of a Python loop over the tensors, where the update is position-independent.

    Not a torch.optim.Optimizer: its methods import torch._dynamo on their first call, which costs
    more start-up (about 2 s) than a whole epoch. What train.py uses of one is here: param_groups,
    state, step, zero_grad, state_dict and load_state_dict, so checkpoints load into the torch class
    and back.
    """

    torch_class = None  # the torch.optim class whose arithmetic and state_dict this keeps
    state_names = ()  # the state tensors per parameter, as the torch class names them
    counts_steps = False  # whether the torch class keeps a "step" count per parameter

    def __init__(self, parameters, **options):
        parameters = list(parameters)
        torch_options = {
            name: parameter.default
            for name, parameter in inspect.signature(self.torch_class.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        self.defaults = {**torch_options, **options}
        self.param_groups = [{"params": parameters, **self.defaults}]
        self.state = {}
        self.torch_optimizer = None  # the torch class itself, once a step had a parameter without a gradient
        # Each parameter starts 256 bytes into the buffer, as a tensor of its own does: with 2 threads a
        # matrix product's last bits depend on its output's address (seen on AMD EPYC: 2 of fc3's 170
        # weight gradients, for a tensor starting 56 bytes past a 64-byte boundary). The last is not
        # padded: its tail stays the buffer's, where fused Adam rounds as on its own tensor.
        self.sizes = [parameter.numel() for parameter in parameters]
        self.padded = [-(-size // ALIGNMENT) * ALIGNMENT for size in self.sizes[:-1]] + self.sizes[-1:]
        self.flat_params = parameters[0].new_zeros(sum(self.padded))
        self.flat_grads = torch.zeros_like(self.flat_params)
        self.flat_states = [torch.zeros_like(self.flat_params) for _ in self.state_names]
        with torch.no_grad():
            for parameter, param_view, grad_view in zip(
                parameters, self.views(self.flat_params), self.views(self.flat_grads)
            ):
                param_view.copy_(parameter)
                parameter.data, parameter.grad = param_view, grad_view
        self.grad_views = [parameter.grad for parameter in parameters]
        # torch keeps the step counts on the CPU unless fused; one 0-d view each, as torch's own tensors
        self.flat_steps = torch.zeros(
            len(parameters), device=self.flat_params.device if options.get("fused") else "cpu"
        )

    def views(self, flat):
        """Each parameter's view of a flat buffer, in the parameters' shapes."""
        return [
            chunk[:size].view_as(parameter)
            for chunk, size, parameter in zip(flat.split(self.padded), self.sizes, self.param_groups[0]["params"])
        ]

    def _bind_state(self):
        """torch's state per parameter, as views of the flat buffers (made at the first step, as torch's)."""
        for index, parameter in enumerate(self.param_groups[0]["params"]):
            steps = {"step": self.flat_steps[index]} if self.counts_steps else {}
            self.state[parameter] = steps | dict(
                zip(self.state_names, (views[index] for views in map(self.views, self.flat_states)))
            )

    def zero_grad(self, set_to_none=True):
        """As torch's: the gradients go (a backward pass makes new ones, which step copies in)."""
        for parameter in self.param_groups[0]["params"]:
            parameter.grad = None

    @torch.no_grad()
    def step(self):
        """One update from the parameters' gradients, as the torch class's step(): FastStep writes them into
        the flat buffer, autograd's are copied there. torch's loop skips a parameter without a gradient,
        which one flat update cannot: from such a step on, the torch class itself steps, from this state."""
        parameters = self.param_groups[0]["params"]
        if self.torch_optimizer is None and any(parameter.grad is None for parameter in parameters):
            state = self.state_dict()
            self.torch_optimizer = self.torch_class(parameters, **self.defaults)
            self.torch_optimizer.load_state_dict(state)
        if self.torch_optimizer is not None:
            return self.torch_optimizer.step()
        if not self.state:
            self._bind_state()
        for parameter, view in zip(parameters, self.grad_views):
            if parameter.grad is not view:
                view.copy_(parameter.grad)
        self.flat_steps.add_(1)
        self.update(
            self.flat_params, self.flat_grads, self.flat_states, self.flat_steps[0].item(), self.param_groups[0]
        )

    def state_dict(self):
        """torch.optim's layout: {"state": {index: {...}}, "param_groups": [{..., "params": [0, 1, ...]}]}."""
        if self.torch_optimizer is not None:
            return self.torch_optimizer.state_dict()
        parameters = self.param_groups[0]["params"]
        group = {key: value for key, value in self.param_groups[0].items() if key != "params"}
        return {
            "state": {
                index: dict(self.state[parameter])
                for index, parameter in enumerate(parameters)
                if self.state.get(parameter)
            },  # SGD without momentum keeps none
            "param_groups": [{**group, "params": list(range(len(parameters)))}],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        """Load what this class or the torch class saved, as checkpoints.check_optimizer_state allows it:
        one step count for all parameters, the hyper-parameters this run's."""
        if self.torch_optimizer is not None:
            return self.torch_optimizer.load_state_dict(state_dict)
        saved = state_dict["state"]
        if saved and any(
            saved.get(index, {}).get(name) is None for index in range(len(self.sizes)) for name in self.state_names
        ):
            raise ValueError("the saved state steps some parameters and not others")
        if saved:
            self._bind_state()
            for index, parameter in enumerate(self.param_groups[0]["params"]):
                for name in self.state_names:
                    self.state[parameter][name].copy_(saved[index][name])
            # a state without a step count (SGD's) has stepped at least once
            self.flat_steps.fill_(float(saved[0]["step"]) if self.counts_steps else 1.0)


class FlatAdam(FlatOptimizer):
    """torch.optim.Adam's default step over flat buffers: each call one that torch's for-loop Adam makes per
    tensor, in its order (adam_elementwise), bit-identical where the kernels are position-independent. With
    fused=True, torch's one-kernel fused Adam: the same update, faster, rounded differently in the last bits."""

    torch_class = torch.optim.Adam
    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True

    def __init__(self, parameters, lr=1e-3, fused=False):
        super().__init__(parameters, lr=lr, **({"fused": True} if fused else {}))

    def update(self, params, grads, states, step, group):
        exp_avgs, exp_avg_sqs = states
        if not group["fused"]:
            return adam_elementwise(params, grads, exp_avgs, exp_avg_sqs, step, group)
        torch._fused_adam_(
            [params],
            [grads],
            [exp_avgs],
            [exp_avg_sqs],
            [],
            [self.flat_steps[0]],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=0,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )


class FlatSGD(FlatOptimizer):
    """torch.optim.SGD's default step (with momentum, no weight decay or nesterov) over flat buffers."""

    torch_class = torch.optim.SGD

    def __init__(self, parameters, lr=1e-3, momentum=0.0):
        self.state_names = ("momentum_buffer",) if momentum else ()  # torch's SGD keeps none without momentum
        super().__init__(parameters, lr=lr, momentum=momentum)

    def update(self, params, grads, states, step, group):
        sgd_elementwise(params, grads, states[0] if states else None, step, group)  # no buffer: momentum 0


# ----------------------------------------------------------------------------- choosing


def make_optimizer(name, parameters, settings):
    """The optimizer OPTIMIZERS names, over `parameters`, with settings {lr, momentum, weight_decay (None: the
    torch class's default), fused}: FlatAdam or FlatSGD where they compute what torch's optimizer computes
    bit for bit (plain Adam or SGD, float32 on the CPU, kernels position-independent) or where fused asks
    for torch's fused kernel; elsewhere the torch.optim class itself."""
    parameters = list(parameters)
    lr, momentum, weight_decay, fused = (
        settings.get(key, default)
        for key, default in (("lr", 1e-3), ("momentum", 0.0), ("weight_decay", None), ("fused", False))
    )
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "adam-no-bias-correction":
        return mnist_mlp.AdamByHand(parameters, lr=lr, bias_correction=False)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, **decay)
    device = parameters[0].device
    flat = not weight_decay and all(
        parameter.dtype == torch.float32 and parameter.device == device for parameter in parameters
    )
    if name == "adam":
        if flat and (
            fused
            and _fused_adam_works(device)
            or device.type == "cpu"
            and not fused
            and elementwise_is_position_independent(adam_elementwise, "cpu")
        ):
            return FlatAdam(parameters, lr=lr, fused=fused)
        return torch.optim.Adam(parameters, lr=lr, **decay, **({"fused": True} if fused else {}))
    if flat and not fused and device.type == "cpu" and elementwise_is_position_independent(sgd_elementwise, "cpu"):
        return FlatSGD(parameters, lr=lr, momentum=momentum)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, **decay, **({"fused": True} if fused else {}))


@functools.lru_cache(maxsize=None)
def _fused_adam_works(device):
    """Some torch versions accept fused=True and fail only at the first step: one step on a scratch tensor."""
    scratch = torch.zeros(3, device=device)
    try:
        FlatAdam([torch.nn.Parameter(scratch)], fused=True).step()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def optimizer_config(optimizer):
    """The name and hyper-parameters that rebuild `optimizer`: plain values for the checkpoint's config."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, (torch.optim.SGD, FlatSGD)):
        name = "sgd"
    elif isinstance(optimizer, torch.optim.AdamW):
        name = "adamw"  # decoupled decay is another optimizer
    else:
        name = "adam-no-bias-correction" if group.get("bias_correction") is False else "adam"
    config = {
        key: list(group[key]) if key == "betas" else group[key] for key in optimizers.OPTIMIZERS[name].hyper_parameters
    }
    return {"optimizer": name, **config}


def make_training(model, criterion, settings, choice="auto", batch_sizes=(64,)):
    """(step, optimizer, description) for train.py: step(x, labels) -> the batch's loss.

    "autograd" is textbook_step. "fast" is FastStep, allowed only where
    fast_step_problem finds none, on each of batch_sizes (every size the step will be given) and the
    threads it runs on; "auto" takes FastStep where it is proven equal and textbook_step elsewhere, and
    the description says which and why, so an edited model is never silently trained as another.
    settings: make_optimizer's, with the optimizer's name under "optimizer".
    """
    problem = "as asked" if choice == "autograd" else fast_step_problem(model, criterion, batch_sizes)
    if choice == "fast" and problem is not None:
        raise UsageError(f"--step fast cannot train this model exactly: {problem}; use --step auto or autograd")
    optimizer = make_optimizer(settings["optimizer"], model.parameters(), settings)
    if problem is not None:
        step = functools.partial(mnist_mlp.textbook_step, model, criterion, optimizer)
        return step, optimizer, f"autograd step ({problem})"
    for parameter in model.parameters():
        if parameter.grad is None:  # FastStep writes into .grad; torch's optimizers read it there
            parameter.grad = torch.zeros_like(parameter)
    step = FastStep(list(model.children()), optimizer)
    return step, optimizer, "fast step (hand-written backward, checked equal to autograd on this model)"


@contextlib.contextmanager
def denormals_flushed():
    """Treat denormal floats as zero on the CPU inside the block, as it was before after it.

    A ReLU unit that is silent on every image (a dead unit: about a third of fc1's after one epoch
    with the tutorial's inputs) gets zero gradients, so Adam's m for its weights shrinks by 0.9 a
    step and becomes denormal after about two epochs; x86 computes on denormals many times slower,
    which made later epochs 40% slower than the first. A denormal m moves its weight by far less
    than one ulp, so the weights stay bit-identical (a test trains two real epochs both ways).
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
