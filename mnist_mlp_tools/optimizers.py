"""The optimizers train.py offers, in one place: each one's name and help, how it is built, what a
checkpoint records of it (its config) and what state it keeps per parameter (checked on resume).

Importing this module loads no torch: train.py lists the names in --help before torch loads, so the
functions that build or read an optimizer import torch themselves.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimizerKind:
    help: str
    state_tensors: tuple  # the state it keeps per parameter, as torch names it
    counts_steps: bool  # whether it keeps a "step" count per parameter
    hyper_parameters: tuple  # the param-group entries a checkpoint's config records


ADAM_STATE, ADAM_HYPER_PARAMETERS = ("exp_avg", "exp_avg_sq"), ("lr", "betas", "eps", "weight_decay")
OPTIMIZERS = {
    "adam": OptimizerKind(
        "Adam, as the tutorial (torch.optim.Adam; --weight-decay adds an L2 term to the gradient)",
        ADAM_STATE,
        True,
        ADAM_HYPER_PARAMETERS,
    ),
    "adamw": OptimizerKind(
        "AdamW: Adam with decoupled --weight-decay, 0.01 by default (torch.optim.AdamW)",
        ADAM_STATE,
        True,
        ADAM_HYPER_PARAMETERS,
    ),
    "sgd": OptimizerKind(
        "SGD with --momentum (torch.optim.SGD)", ("momentum_buffer",), False, ("lr", "momentum", "weight_decay")
    ),
    "adam-no-bias-correction": OptimizerKind(
        "Adam without dividing m and v by (1-beta^t) (mnist_mlp.adam_update)", ADAM_STATE, True, ADAM_HYPER_PARAMETERS
    ),
}


def make_optimizer(name, parameters, lr, momentum=0.9, weight_decay=None, fused=False):
    """The optimizer OPTIMIZERS names, over `parameters`; weight_decay None: the torch class's default.

    By default each computes what torch's optimizer computes, bit for bit: plain Adam and SGD on the
    CPU as FlatAdam's or FlatSGD's for-loop update over float32 flat buffers, everything else (another
    device, a weight decay, AdamW) as the torch.optim class itself. fused=True takes torch's fused
    kernels where they work here (found by one step on a scratch tensor: some torch versions accept
    fused=True and fail only at the first step); fused Adam rounds differently in the last bits.
    """
    import torch  # here, not at the top: see the module's docstring

    import mnist_mlp  # with torch: see the docstring

    from .fast_step import FlatAdam, FlatSGD

    parameters = list(parameters)
    decay = {} if weight_decay is None else {"weight_decay": weight_decay}
    if name == "adam-no-bias-correction":
        if weight_decay:
            raise ValueError("adam-no-bias-correction takes no weight decay")
        return mnist_mlp.AdamByHand(parameters, lr=lr, bias_correction=False)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, **decay)
    device = parameters[0].device if parameters else torch.device("cpu")
    flat = (
        not weight_decay
        and bool(parameters)
        and all(
            parameter.dtype == torch.float32 and parameter.layout == torch.strided and parameter.device == device
            for parameter in parameters
        )
    )
    if name == "adam":
        if fused and flat and _optimizer_works(FlatAdam, device, lr=lr, fused=True):
            return FlatAdam(parameters, lr=lr, fused=True)
        return (
            FlatAdam(parameters, lr=lr)
            if flat and device.type == "cpu"
            else torch.optim.Adam(parameters, lr=lr, **decay)
        )
    if name != "sgd":
        raise ValueError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
    if fused and _optimizer_works(torch.optim.SGD, device, lr=lr, momentum=momentum, fused=True, **decay):
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, fused=True, **decay)
    if flat and device.type == "cpu":
        return FlatSGD(parameters, lr=lr, momentum=momentum)
    return torch.optim.SGD(parameters, lr=lr, momentum=momentum, **decay)


def _optimizer_works(optimizer_class, device, **options):
    import torch  # loaded already: make_optimizer's caller has parameters

    scratch = torch.nn.Parameter(torch.zeros(3, device=device))
    try:
        optimizer = optimizer_class([scratch], **options)
        scratch.grad = torch.ones_like(scratch)
        optimizer.step()
        return bool(torch.isfinite(scratch).all())
    except (RuntimeError, TypeError, NotImplementedError, AttributeError):
        return False


def optimizer_name(optimizer):
    """The OPTIMIZERS name of a built optimizer (AdamW as itself: decoupled decay is another optimizer)."""
    import torch  # loaded already: there is an optimizer

    from .fast_step import FlatSGD  # with torch: see the docstring

    if isinstance(optimizer, (torch.optim.SGD, FlatSGD)):
        return "sgd"
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    return "adam-no-bias-correction" if optimizer.param_groups[0].get("bias_correction") is False else "adam"


def optimizer_config(optimizer):
    """The name and hyper-parameters that rebuild `optimizer`: plain values for the checkpoint."""
    name, group = optimizer_name(optimizer), optimizer.param_groups[0]
    config = {key: list(group[key]) if key == "betas" else group[key] for key in OPTIMIZERS[name].hyper_parameters}
    return {"optimizer": name, **config}
