"""Alignment settings and the cheap checks on them, run before any weight is read.

Importing this module imports neither torch nor transformers, so the CLI and the build can check a request quickly;
the two checks that need a model's layer count or the launch import what they use when called.
"""

from __future__ import annotations

from dataclasses import Field, dataclass, field, fields

from edgekit.errors import UserError

METHODS = ("lppo", "sft")


@dataclass(frozen=True)
class LPPOConfig:
    exit_layer: int
    exit_layers: tuple[int, int] | None = None  # sample the exit layer of each batch from A..B (inclusive)
    steps: int = field(default=100, metadata={"help": "training steps"})
    batch: int = field(default=16, metadata={"help": "rollouts per step"})
    minibatch: int = field(default=4, metadata={"help": "PPO minibatch"})
    ppo_epochs: int = field(default=2, metadata={"help": "PPO epochs per step"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    clip_eps: float = 0.2
    value_clip: float = 0.2
    c1: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_init: float = field(default=0.2, metadata={"help": "initial KL coefficient"})
    kl_target: float | None = field(
        default=3.0, metadata={"help": "KL target of the adaptive controller"}
    )  # None: fixed
    kl_horizon: int = 10000
    max_new_tokens: int = field(default=48, metadata={"help": "response length limit"})
    temperature: float = field(default=0.7, metadata={"help": "rollout sampling temperature, 0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "rollout top-k, 0 = off"})
    seed: int = field(default=0, metadata={"help": "seed"})
    checkpoint_every: int = field(default=25, metadata={"help": "steps between checkpoints, 0 = none"})
    max_grad_norm: float = 0.5
    lora_r: int = 8
    lora_alpha: int = 16
    recompute_activations: bool = field(
        default=True,
        metadata={
            "help": "recompute each language-model layer's activations in the backward instead of keeping them: "
            "memory near inference's, for a second forward through each layer"
        },
    )

    @staticmethod
    def flags() -> tuple[Field, ...]:
        """The fields the command line sets: those with a help text (the rest are recipe constants)."""
        return tuple(f for f in fields(LPPOConfig) if "help" in f.metadata)

    def __post_init__(self):
        if self.exit_layers is not None:
            object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
        ints = (
            "exit_layer",
            "steps",
            "batch",
            "minibatch",
            "ppo_epochs",
            "kl_horizon",
            "max_new_tokens",
            "top_k",
            "seed",
            "checkpoint_every",
            "lora_r",
            "lora_alpha",
        )
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, got {value!r}")
        positive = (
            "exit_layer",
            "steps",
            "batch",
            "minibatch",
            "ppo_epochs",
            "kl_horizon",
            "max_new_tokens",
            "lora_r",
            "lr",
            "value_clip",
            "max_grad_norm",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("c1", "kl_init", "temperature", "top_k", "checkpoint_every", "lora_alpha"):
            if not getattr(self, name) >= 0:
                raise UserError(f"{name} must be at least 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.clip_eps < 1:
            raise UserError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise UserError(f"kl_target must be positive (or None for a fixed coefficient), got {self.kl_target}")
        if not isinstance(self.recompute_activations, bool):
            raise UserError(f"recompute_activations must be true or false, got {self.recompute_activations!r}")
        if self.exit_layers is not None:
            low, high = self.exit_layers
            if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
                raise UserError(f"exit_layers {low}-{high}: expected A-B with 1 <= A <= B")
            if not low <= self.exit_layer <= high:
                raise UserError(f"exit_layer {self.exit_layer} is outside exit_layers {low}-{high}")
        if self.minibatch > self.batch:
            raise UserError(f"minibatch {self.minibatch} is larger than batch {self.batch}")
        if self.batch % self.minibatch:
            raise UserError(f"batch {self.batch} is not a multiple of minibatch {self.minibatch}")
        if self.batch < 2:  # advantages are whitened over the batch's tokens
            raise UserError(f"batch must be at least 2 (advantages are whitened over the batch), got {self.batch}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.exit_layers[0], self.exit_layers[1] + 1)) if self.exit_layers else (self.exit_layer,)


def check_processes(config: LPPOConfig, processes: int, distributed_type: str) -> None:
    """Each process takes an equal share of every batch and minibatch. DDP and FSDP2 are the launches align runs
    under (README: why not DeepSpeed)."""
    from edgekit.align.sharding import fsdp_requested, fsdp_version

    if distributed_type == "DEEPSPEED":
        raise UserError(
            "align does not run under DeepSpeed: launch it with configs/accelerate/ddp.yaml, or "
            "configs/accelerate/fsdp.yaml to shard the language model"
        )
    if fsdp_requested(distributed_type) and fsdp_version() != 2:
        raise UserError(
            f"align shards with FSDP2; this launch asks for FSDP version {fsdp_version()} (set "
            "fsdp_version: 2, as configs/accelerate/fsdp.yaml does)"
        )
    if config.minibatch % processes:
        raise UserError(f"minibatch {config.minibatch} does not split evenly over {processes} processes")


def check_layers(config: LPPOConfig, num_layers: int) -> None:
    """The exit layer and the exit range inside 1..L of the model, or a UserError."""
    from edgekit.model.surgery import check_exit_layer

    check_exit_layer(config.exit_layer, num_layers)
    if config.exit_layers and not (1 <= config.exit_layers[0] and config.exit_layers[1] <= num_layers):
        low, high = config.exit_layers
        raise UserError(
            f"exit layers {low}-{high} are not inside 1..{num_layers} (the vision tower has {num_layers} layers)"
        )
