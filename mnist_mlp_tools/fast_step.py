"""The training step made fast, used only where it is proven equal to mnist_mlp.textbook_step.

FastStep writes the backward pass out beside the forward; FlatAdam and FlatSGD keep parameters,
gradients and the optimizer's state in flat buffers and update them in a few calls; CudaGraphStep replays the whole step
as one CUDA graph; denormals_flushed keeps x86 from slowing down on tiny numbers. make_train_step
chooses, and says which step trains and why.
"""

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

import mnist_mlp

from .commands import UsageError, reason


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
        flat = isinstance(self.optimizer, FlatOptimizer) and self.optimizer.flat
        if flat:
            self.optimizer.grads_into_buffer()  # an autograd step in between may have put new .grad tensors
        loss, _ = self.forward_backward(x, labels, [(layer.weight.grad, layer.bias.grad) for layer in self.layers])
        if flat:
            self.optimizer.step_unhooked()  # the gradients were written straight into its flat buffer
        else:
            self.optimizer.step()
        return loss


def fast_step_problem(model, criterion, batch_sizes):
    """Why FastStep cannot train this model exactly, or None if it can.

    It can when the model is only a chain of nn.Linear layers, the loss is nn.CrossEntropyLoss()
    with its defaults, no hooks are registered, and on a probe batch of each of the run's batch
    sizes, on the threads it runs on, the model's own forward() and autograd give bit-identical
    logits, loss and gradients to FastStep's: a matrix library may split a product differently by
    its shape and thread count (seen with 2 threads on an AVX2 EPYC: 2 gradient elements of 170 at
    batch 50, equal at 64). The probe leaves no trace: random generators, gradients and the model
    are as they were.
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
            return f"the fast step does not run on {device} ({reason(error)})"
        with torch.enable_grad():
            try:
                logits = model(x)
            except Exception as error:  # a forward() written for other inputs: the textbook step's to meet
                return f"the model's forward() does not take rows of {linears[0].in_features} ({reason(error)})"
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
    from torch.nn.modules import module as module_globals  # where nn.Module keeps its global hooks

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
    gradients and each state tensor live in one contiguous buffer, updated by a few calls over the
    whole buffer instead of a Python loop over the tensors.

    Not a torch.optim.Optimizer: its methods import torch._dynamo on their first call, which costs
    more start-up (about 2 s) than a whole epoch. What train.py uses of one is here: param_groups,
    state, step, zero_grad, state_dict and load_state_dict, so checkpoints load into the torch class
    and back. A subclass names its torch class, its state tensors and its elementwise update.
    """

    torch_class = None  # the torch.optim class whose arithmetic and state_dict this keeps
    state_names = ()  # the state tensors per parameter, as the torch class names them
    counts_steps = False  # whether the torch class keeps a "step" count per parameter
    update = None  # the elementwise update, as the torch class's for-loop makes it

    def __init__(self, parameters, **options):
        parameters = list(parameters)
        torch_options = torch_defaults(self.torch_class)
        unknown = set(options) - set(torch_options)
        if unknown:
            raise TypeError(f"{type(self).__name__} takes no {sorted(unknown)}")
        self.defaults = defaults = {**torch_options, **options}
        self.param_groups = [{"params": parameters, **defaults}]
        self.state = {}
        # Each parameter starts 256 bytes into the buffer, as a tensor of its own does: with 2 threads a
        # matrix product's last bits depend on its output's address (seen on AMD EPYC: 2 of fc3's 170
        # weight gradients, for a tensor starting 56 bytes past a 64-byte boundary).
        self._sizes = [parameter.numel() for parameter in parameters]
        # (the last unpadded: its tail stays the buffer's, where fused Adam's kernel rounds as on its own tensor)
        self._padded = [-(-size // ALIGNMENT) * ALIGNMENT for size in self._sizes[:-1]] + self._sizes[-1:]
        self.flat_params = parameters[0].new_zeros(sum(self._padded)) if parameters else torch.zeros(0)
        self.flat_grads = torch.zeros_like(self.flat_params)
        with torch.no_grad():
            for parameter, param_view, grad_view in zip(
                parameters, self.views(self.flat_params), self.views(self.flat_grads)
            ):
                param_view.copy_(parameter)
                parameter.data = param_view
                parameter.grad = grad_view
        self._grad_views = [parameter.grad for parameter in parameters]
        self._elementwise_exact = bool(defaults.get("fused")) or elementwise_is_position_independent(
            type(self).update, str(self.flat_params.device)
        )
        # torch keeps the step counts on the CPU unless fused or capturable
        step_device = self.flat_params.device if defaults.get("fused") else "cpu"
        self.flat_steps = torch.zeros(len(parameters), device=step_device)  # each parameter's step count
        self._one = torch.ones((), device=step_device)
        self.flat_states = [torch.zeros_like(self.flat_params) for _ in self.state_names]
        # one call serves all parameters while they share one step count and the kernels allow it
        self.flat = self._elementwise_exact

    def views(self, flat):
        """Each parameter's view of a flat buffer, in the parameters' shapes."""
        return [
            chunk[:size].view_as(parameter)
            for chunk, size, parameter in zip(flat.split(self._padded), self._sizes, self.param_groups[0]["params"])
        ]

    def _bind_state(self, index):
        """The state of parameter `index`, as views of the flat buffers (made at its first step)."""
        parameter = self.param_groups[0]["params"][index]
        if parameter not in self.state:
            views = [self.views(flat)[index] for flat in self.flat_states]
            self.state[parameter] = ({"step": self.flat_steps[index]} if self.counts_steps else {}) | dict(
                zip(self.state_names, views)
            )
        return self.state[parameter]

    def grads_into_buffer(self):
        """Make each parameter's .grad its view of the flat gradient buffer again."""
        for parameter, view in zip(self.param_groups[0]["params"], self._grad_views):
            if parameter.grad is not view:
                parameter.grad = view

    def zero_grad(self, set_to_none=True):
        """As torch's: .grad becomes None (or zero)."""
        for parameter in self.param_groups[0]["params"]:
            if set_to_none:
                parameter.grad = None
            elif parameter.grad is not None:
                parameter.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """One update from the parameters' .grad, as the torch class's step()."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        parameters = self.param_groups[0]["params"]
        grads = [parameter.grad for parameter in parameters]
        if not self.flat or any(grad is None for grad in grads):
            self.flat = False  # a parameter without a gradient is skipped, as torch does: the step counts part ways
            self._step_each(parameters, grads)
            return loss
        for grad, view in zip(grads, self._grad_views):
            if grad is not view:  # autograd made new .grad tensors: copy them in (exact) for the flat update
                view.copy_(grad)
        self.step_unhooked()
        return loss

    def step_unhooked(self):
        """step() for gradients already in the flat buffer: FastStep writes its gradients there itself."""
        self.flat_steps.add_(self._one)
        if not self.state:
            for index in range(len(self._sizes)):
                self._bind_state(index)
        self._update(self.flat_params, self.flat_grads, self.flat_states, self.flat_steps[0])

    def _step_each(self, parameters, grads):
        """torch's per-tensor loop: where the kernels round by position, or the step counts differ."""
        for index, (parameter, grad) in enumerate(zip(parameters, grads)):
            if grad is None:
                continue
            state = self._bind_state(index)
            self.flat_steps[index].add_(self._one)
            self._update(parameter, grad, [state[name] for name in self.state_names], self.flat_steps[index])

    def _update(self, params, grads, states, step):
        type(self).update(params, grads, *states, step.item(), self.param_groups[0])

    def state_dict(self):
        """torch.optim's layout: {"state": {index: {...}}, "param_groups": [{..., "params": [0, 1, ...]}]}."""
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

    def load_state_dict(self, state_dict):
        """Load what this class or the torch class saved; a hyper-parameter this class does not
        implement (amsgrad, weight decay, ...) other than at its default is refused."""
        parameters = self.param_groups[0]["params"]
        (saved_group,) = state_dict["param_groups"]
        if saved_group["params"] != list(range(len(parameters))):
            raise ValueError("the saved state names other parameters")
        for key, value in saved_group.items():
            if key not in (
                "params",
                "lr",
                "betas",
                "eps",
                "momentum",
                "foreach",
                "fused",
            ) and value != self.defaults.get(key):
                raise ValueError(f"the saved state has {key}={value!r}, which {type(self).__name__} does not do")
        self.param_groups[0].update(
            {key: saved_group[key] for key in ("lr", "betas", "eps", "momentum") if key in saved_group}
        )
        with torch.no_grad():
            for index, saved in state_dict["state"].items():
                if any(saved.get(name) is None for name in self.state_names):
                    continue  # torch's SGD may keep a None buffer: the parameter has not stepped yet
                state = self._bind_state(index)
                for name in self.state_names:
                    state[name].copy_(saved[name])
                # a state without a step count (SGD's) has stepped at least once
                self.flat_steps[index].fill_(float(saved["step"]) if self.counts_steps else 1.0)
        stepped = [index for index, parameter in enumerate(parameters) if parameter in self.state]
        self.flat = (
            self._elementwise_exact
            and len(stepped) in (0, len(parameters))
            and len(set(self.flat_steps[stepped].tolist())) <= 1
        )


class FlatAdam(FlatOptimizer):
    """torch.optim.Adam's default step over flat buffers (each call one that torch's for-loop Adam
    makes per tensor, in its order: adam_elementwise), so the weights are bit-identical to the
    tutorial's Adam wherever the kernels are position-independent (checked on the machine at hand;
    where they are not, it steps tensor by tensor). fused=True takes torch's one-kernel fused Adam
    instead: the same update, faster, rounded differently in the last bits.
    """

    torch_class = torch.optim.Adam
    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True
    update = staticmethod(adam_elementwise)

    def __init__(self, parameters, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, fused=False):
        super().__init__(parameters, lr=lr, betas=betas, eps=eps, **({"fused": True} if fused else {}))

    def _update(self, params, grads, states, step):
        group = self.param_groups[0]
        if not group["fused"]:  # the step count as torch reads it: .item() of its CPU tensor
            return adam_elementwise(params, grads, *states, step.item(), group)
        torch._fused_adam_(
            [params],
            [grads],
            states[:1],
            states[1:],
            [],
            [step],
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=0,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )


class FlatSGD(FlatOptimizer):
    """torch.optim.SGD's default step (with momentum, no weight decay or nesterov) over flat buffers,
    bit-identical to it where the kernels are position-independent, as FlatAdam."""

    torch_class = torch.optim.SGD
    state_names = ("momentum_buffer",)
    update = staticmethod(sgd_elementwise)

    def __init__(self, parameters, lr=1e-3, momentum=0.0):
        super().__init__(parameters, lr=lr, momentum=momentum)
        if momentum == 0:
            self.state_names = ()  # torch's SGD keeps no state without momentum


# ----------------------------------------------------------------------------- CUDA graph


class CudaGraphStep:
    """FastStep and its fused FlatAdam update captured once in a CUDA graph, then replayed each step.

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
        self.x.copy_(x.reshape(len(x), -1))  # (N, 1, 28, 28) images into the (N, 784) buffer
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss.clone()  # the graph rewrites its loss tensor at the next replay


def make_train_step(model, criterion, optimizer, choice="auto", batch_sizes=(64,), cuda_graph=False):
    """(step, description): the step train.py runs, step(x, labels) -> the batch's loss.

    "autograd" is textbook_step. "fast" is FastStep, allowed only where fast_step_problem finds
    none; "auto" takes FastStep where it is proven equal and textbook_step elsewhere, and the
    description says which and why, so an edited model is never silently trained as another.
    cuda_graph=True replays the fast step as a CUDA graph (CudaGraphStep) where the model is
    on CUDA and the optimizer is the fused FlatAdam; the description says when it cannot.
    batch_sizes: every batch size the step will be given (the proof holds for those alone).
    """
    problem = None if choice == "autograd" else fast_step_problem(model, criterion, batch_sizes)
    if choice == "fast" and problem is not None:
        raise UsageError(f"--step fast cannot train this model exactly: {problem}; use --step auto or autograd")
    on_cuda = next(model.parameters()).device.type == "cuda"
    if choice == "autograd" or problem is not None:
        reason_text = "as asked" if choice == "autograd" else problem
        graph = "; not as a CUDA graph, which only the fast step can be" if cuda_graph and on_cuda else ""
        return (
            lambda x, labels: mnist_mlp.textbook_step(model, criterion, optimizer, x, labels),
            f"autograd step ({reason_text}{graph})",
        )
    linears = list(model.children())
    for layer in linears:
        for parameter in (layer.weight, layer.bias):
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
    step = FastStep(linears, optimizer)
    description = "fast step (hand-written backward, checked equal to autograd on this model)"
    if cuda_graph and on_cuda:
        if isinstance(optimizer, FlatAdam) and optimizer.flat and optimizer.param_groups[0]["fused"]:
            step = CudaGraphStep(step, max(batch_sizes), linears[0].in_features)
            description += ", replayed as a CUDA graph"
        else:
            description += "; not as a CUDA graph, which needs --fused Adam"
    return step, description


# ----------------------------------------------------------------------------- denormals


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
