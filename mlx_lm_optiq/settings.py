"""The settings of a run: one dataclass, its defaults, help and checks together.

:class:`RunSettings` is to mlx-lm-optiq what PEFT's ``LoraConfig`` is to
PEFT. Its fields are the options ``mlx_lm.lora`` gains (:func:`add_arguments`
generates them, so ``--help``, the YAML keys and the README cannot drift
apart), and :func:`from_args` builds it from mlx-lm's merged arguments
(command line over YAML over defaults) before the model is loaded. Its
``__post_init__`` checks every field and raises one :class:`OptiqError` that
lists every problem.

A run that names none of these options is stock mlx-lm: nothing changes.
"""

import argparse
import math
import re
from dataclasses import InitVar, dataclass, field, fields
from typing import FrozenSet, Optional, Sequence, Union

from .checks import is_finite, is_whole
from .errors import OptiqError

BASE_COMPUTE = ("quantized", "dequantized", "auto")
LORA_COMPUTE = ("auto", "float32", "input")
LORA_INIT = ("default", "gradient")
LORA_SCALE = ("fixed", "per-rank", "rslora")
BUDGET_WORDS = ("free", "match", "default")
DEFAULT_ALIGNMENT = 128
# MLX's fused attention backward on CUDA runs out of memory once one call's
# batch x query heads x key length x head dim reaches 2^28 (measured:
# benchmarks/sdpa_long.py); half that runs, in the same time
DEFAULT_ATTENTION_PIECE = 2**27

GROUP_TITLE = "per-module LoRA ranks and a lean training step (mlx-lm-optiq)"
GROUP_DESCRIPTION = (
    "Give every adapted module its own LoRA rank, spend a parameter budget "
    "over the whole model, and train with aligned batches and a chunked loss. "
    "Each option is also a YAML key: the name with underscores (rank_scaling, "
    "rank_budget, ...). A run that uses none of them is stock mlx-lm."
)


def _option(help, metavar=None, choices=None):
    return {"help": help, "metavar": metavar, "choices": choices}


@dataclass
class RunSettings:
    """What a run asks of mlx-lm-optiq; each field is an option and a YAML key."""

    rank_scaling: Optional[str] = field(
        default=None,
        metadata=_option(
            "how each module's LoRA rank is chosen. by_kl: rank * KL / median KL "
            "clipped to [0.5, 2], from optiq/sensitivity.json (falls back to "
            "by_bits); our study's recommendation with --num-layers -1 "
            "--rank-budget default, though constant over all layers gets nearly "
            "all of that gain. constant: the base rank everywhere (what stock "
            "mlx-lm trains). by_bits: rank * bits / 4, so 8-bit modules get twice "
            "the rank of 4-bit ones. allocate: water-filling of the budget by KL, "
            "the least sensitive modules left out when it is tight. by_grad: the "
            "ranks shared by gradient importance from optiq/gradient.json "
            "(mlx_lm_optiq.sensitivity --signal gradient), rank 0 allowed. "
            "Plugins add others.",
            choices="policies",
        ),
    )
    rank: Optional[int] = field(
        default=None,
        metadata=_option(
            "base LoRA rank (sets lora_parameters.rank; mlx-lm's default is 8)",
            metavar="R",
        ),
    )
    rank_budget: Union[str, int] = field(
        default="free",
        metadata=_option(
            "free (default): keep the policy's ranks; match: rescale them to the "
            "parameters constant rank would train on the adapted modules; default: "
            "to what constant --rank trains on mlx-lm's default window (the last "
            "16 layers), whatever --num-layers says; COUNT: to that many adapter "
            "parameters (250000, 250k, 1.3M). Never over the budget.",
            metavar="{free,match,default,COUNT}",
        ),
    )
    rank_range: float = field(
        default=4.0,
        metadata=_option(
            "how far a module's KL may count from the median, [1/R, R], for the "
            "policies that weigh modules by KL (allocate); a number >= 1, "
            "default 4",
            metavar="R",
        ),
    )
    base_compute: str = field(
        default="quantized",
        metadata=_option(
            "quantized (default): train on the quantized base as loaded; "
            "dequantized: on dequantized copies of its frozen quantized layers "
            "(the same function up to rounding, faster where quantized matmuls "
            "are slow, ~4x the weight memory of 4-bit); auto: dequantized when the "
            "copies take at most a quarter of the device memory. The adapter is "
            "for the quantized model either way.",
            choices=BASE_COMPUTE,
        ),
    )
    align_inputs: Union[str, int] = field(
        default="auto",
        metadata=_option(
            "pad each batch so the model's input length is a multiple of N (the "
            "length MLX's fused attention backward needs on CUDA); padding is "
            "masked, and --max-seq-length then counts model-input tokens. auto "
            "(default): 128 on CUDA, off elsewhere; on: 128",
            metavar="{auto,on,off,N}",
        ),
    )
    loss_chunk: Union[str, int] = field(
        default="auto",
        metadata=_option(
            "compute the loss N positions at a time from the final hidden "
            "states, so the full batch x length x vocabulary logits never exist "
            "(the gradient of each chunk is taken as it is computed). auto "
            "(default): on CUDA, chunks of about 256 MB of float32 logits; off "
            "elsewhere; on: the same size everywhere",
            metavar="{auto,on,off,N}",
        ),
    )
    attention_piece: Union[str, int] = field(
        default="auto",
        metadata=_option(
            "run the fused attention in pieces over the query heads (with their "
            "key/value heads), so that no call holds more than N elements of "
            "batch x query heads x key length x head dim: the same result, and "
            "on CUDA MLX's fused attention backward runs out of memory at 2^28 "
            "(65,536 tokens at Llama-3.1-8B's heads). auto (default): 2^27 on "
            "CUDA, off elsewhere; on: 2^27",
            metavar="{auto,on,off,N}",
        ),
    )
    lora_compute: str = field(
        default="auto",
        metadata=_option(
            "the dtype of the LoRA matmuls. float32: as mlx-lm computes them "
            "(activations upcast, as PEFT's default does); input: the LoRA "
            "matrices cast to the activations' dtype (bf16 for a bf16 model), "
            "their weights and optimizer state staying float32; auto (default): "
            "input on CUDA, float32 elsewhere",
            choices=LORA_COMPUTE,
        ),
    )
    lora_init: str = field(
        default="default",
        metadata=_option(
            "default: mlx-lm's (lora_a random, lora_b zero); gradient: each "
            "module's lora_a from the top right singular vectors of its weight's "
            "gradient (mlx_lm_optiq.sensitivity --signal gradient), lora_b zero, "
            "so the model starts as the base and the first steps follow the full "
            "gradient's main directions; the base weights are not changed",
            choices=LORA_INIT,
        ),
    )
    lora_scale: str = field(
        default="fixed",
        metadata=_option(
            "each module's LoRA scale with --rank-scaling. fixed (default): "
            "mlx-lm's one scale, so more rank also means a larger step; "
            "per-rank: scale * r0 / r (the same PEFT alpha everywhere); rslora: "
            "scale * sqrt(r0 / r); r0 is the base rank. Recorded in "
            "lora_parameters.scale_pattern, the sidecar and PEFT's alpha_pattern",
            choices=LORA_SCALE,
        ),
    )
    lora_plus_ratio: Optional[float] = field(
        default=None,
        metadata=_option(
            "LoRA+: every lora_b update R times as large as mlx-lm's optimizer "
            "makes it, so B's learning rate is R times A's (the LoRA+ paper: "
            "4-16); the schedule, optimizer and checkpoints stay mlx-lm's. "
            "Default: off (1)",
            metavar="R",
        ),
    )
    # which options the run named; none: stock mlx-lm
    given: FrozenSet[str] = field(default=frozenset(), metadata={"option": False})
    policies: InitVar[Sequence[str]] = ()
    fine_tune_type: InitVar[str] = "lora"
    budget: Union[str, int] = field(init=False, metadata={"option": False})

    def __post_init__(self, policies, fine_tune_type):
        problems = []

        def check(name, convert):
            try:
                setattr(self, name, convert(getattr(self, name)))
            except OptiqError as e:
                problems.append(f"{option_name(name)} {getattr(self, name)!r}: {e}")

        if policies and self.rank_scaling is not None:
            if self.rank_scaling not in policies:
                problems.append(
                    f"--rank-scaling {self.rank_scaling!r}: choose one of "
                    f"{', '.join(policies)}"
                )
        if self.rank is not None:
            check("rank", _positive_whole)
        check("rank_range", _at_least_one)
        if self.base_compute not in BASE_COMPUTE:
            problems.append(
                f"--base-compute {self.base_compute!r}: choose one of "
                f"{', '.join(BASE_COMPUTE)}"
            )
        if self.lora_compute not in LORA_COMPUTE:
            problems.append(
                f"--lora-compute {self.lora_compute!r}: choose one of "
                f"{', '.join(LORA_COMPUTE)}"
            )
        if self.lora_init not in LORA_INIT:
            problems.append(
                f"--lora-init {self.lora_init!r}: choose one of {', '.join(LORA_INIT)}"
            )
        if self.lora_scale not in LORA_SCALE:
            problems.append(
                f"--lora-scale {self.lora_scale!r}: choose one of {', '.join(LORA_SCALE)}"
            )
        if self.rank_scaling is None and "lora_scale" in self.given:
            problems.append("--lora-scale needs --rank-scaling")
        if self.lora_plus_ratio is not None:
            check("lora_plus_ratio", _positive)
        check("align_inputs", _switch_or_count)
        check("loss_chunk", _switch_or_count)
        check("attention_piece", _switch_or_count)
        self.budget = "free"
        try:
            self.budget = parse_budget(self.rank_budget)
        except OptiqError as e:
            problems.append(f"--rank-budget {self.rank_budget!r}: {e}")
        if self.rank_scaling is None and "rank_budget" in self.given:
            problems.append("--rank-budget needs --rank-scaling")
        if self.rank_scaling is not None and fine_tune_type == "full":
            problems.append(
                "--rank-scaling needs --fine-tune-type lora or dora, not full"
            )
        if problems:
            raise OptiqError("; ".join(problems))
        self.rank_budget = str(self.rank_budget).strip()

    @property
    def active(self) -> bool:
        """Whether the run names any of these options (else: stock mlx-lm)."""
        return bool(self.given)

    def alignment(self, device: str) -> Optional[int]:
        """The model-input multiple batches are padded to on ``device``, or None."""
        return _resolve(self.align_inputs, device, DEFAULT_ALIGNMENT)

    def attention_limit(self, device: str) -> Optional[int]:
        """The most elements one fused attention call holds on ``device``, or None."""
        return _resolve(self.attention_piece, device, DEFAULT_ATTENTION_PIECE)

    def lora_in_input_dtype(self, device: str) -> bool:
        """Whether the LoRA matmuls run in the activations' dtype on ``device``."""
        return self.lora_compute == "input" or (
            self.lora_compute == "auto" and device == "cuda"
        )

    def chunk(self, device: str, vocab_size: int) -> Optional[int]:
        """Positions per chunk of the loss on ``device``, or None (mlx-lm's loss)."""
        return _resolve(self.loss_chunk, device, auto_chunk(vocab_size))


def auto_chunk(vocab_size: int) -> int:
    """Positions whose float32 logits take about 256 MB: a power of two, 256 to
    8192."""
    positions = 2**26 / max(vocab_size, 1)
    return int(min(8192, max(256, 2 ** math.floor(math.log2(positions)))))


def _resolve(value, device, size):
    if value == "off" or (value == "auto" and device != "cuda"):
        return None
    return size if value in ("auto", "on") else value


def _positive_whole(value):
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not is_whole(value) or value <= 0:
        raise OptiqError("the LoRA rank must be a positive integer")
    return value


def _number(value):
    """A number from the command line (text) or YAML; None if it is none."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return None


def _positive(value):
    number = _number(value)
    if not is_finite(number) or number <= 0:
        raise OptiqError("must be a positive number")
    return float(number)


def _at_least_one(value):
    number = _number(value)
    if not is_finite(number) or number < 1:
        raise OptiqError("must be a number >= 1")
    return float(number)


def _switch_or_count(value):
    # YAML reads on/off as true/false
    if value is True or value is False:
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in ("auto", "on", "off"):
        return value.strip().lower()
    try:
        count = _positive_whole(value)
    except OptiqError:
        raise OptiqError("give auto, on, off or a positive number") from None
    return count


_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")


def parse_budget(value) -> Union[str, int]:
    """``free``, ``match``, ``default`` or a parameter count (``250000``,
    ``250k``, ``1.3M``) from ``--rank-budget``."""
    if isinstance(value, str) and value.strip().lower() in BUDGET_WORDS:
        return value.strip().lower()
    if is_whole(value):
        count = value
    else:
        found = _COUNT.match(str(value)) if isinstance(value, (str, float)) else None
        if found is None:
            raise OptiqError(
                "give free, match, default or a number of adapter parameters such "
                "as 250000, 250k or 1.3M"
            )
        number, unit = found.groups()
        count = round(
            float(number) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit.lower()]
        )
    if count <= 0:
        raise OptiqError("the budget must be positive")
    return count


def options() -> list:
    """The fields that are options, in the order ``--help`` lists them."""
    return [f for f in fields(RunSettings) if f.metadata.get("option", True)]


def option_name(name: str) -> str:
    """``rank_budget`` -> ``--rank-budget``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, policies: Sequence[str]) -> None:
    """Add every option of :class:`RunSettings` to ``mlx_lm.lora``'s parser.

    Every default is ``None`` so that mlx-lm's YAML config can fill it in;
    the values are checked once merged (:func:`from_args`).
    """
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    for f in options():
        choices = f.metadata["choices"]
        metavar = f.metadata["metavar"]
        if choices == "policies":
            choices = list(policies)  # argparse checks them, and lists them
        elif choices:
            metavar = "{" + ",".join(choices) + "}"  # YAML values are checked later
            choices = None
        group.add_argument(
            option_name(f.name),
            dest=f.name,
            default=None,
            choices=choices,
            metavar=metavar,
            help=f.metadata["help"],
        )


def from_args(args, policies: Sequence[str] = ()) -> RunSettings:
    """The settings ``args`` asks for (mlx-lm's namespace, YAML merged in).

    Args:
        args: ``mlx_lm.lora``'s arguments; missing options count as not given.
        policies: the rank policy names ``--rank-scaling`` may name.
    """
    given = {
        f.name: getattr(args, f.name)
        for f in options()
        if getattr(args, f.name, None) is not None
    }
    return RunSettings(
        **given,
        given=frozenset(given),
        policies=tuple(policies),
        fine_tune_type=getattr(args, "fine_tune_type", "lora"),
    )
