"""The optimizers train.py offers, in one place: each one's name and help, what a checkpoint records of it
(its config) and what state it keeps per parameter (checked on resume); fast_step.make_optimizer builds them.
Plain data, without torch: train.py lists the names in --help before torch loads."""

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
