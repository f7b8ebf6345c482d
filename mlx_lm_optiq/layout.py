"""The names in an adapter directory: its files, and its tensors in PEFT's layout.

mlx-lm's layout: ``<module path>.lora_a`` is ``(in, r)`` and ``.lora_b``
``(r, out)``. PEFT's: ``base_model.model.<module path>.lora_A.weight`` is
``(r, in)`` and ``.lora_B.weight`` ``(out, r)``.
"""

MLX_WEIGHTS = "adapters.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
SIDECAR = "optiq_lora_config.json"

PEFT_PREFIX = "base_model.model."
PEFT_LEAVES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}


def peft_key(path: str, leaf: str) -> str:
    """PEFT's tensor name for mlx-lm's ``<path>.<leaf>`` (``lora_a``/``lora_b``)."""
    return f"{PEFT_PREFIX}{path}.{PEFT_LEAVES[leaf]}"
