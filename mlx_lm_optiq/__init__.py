"""Per-module LoRA ranks for mlx-lm, chosen from quantization sensitivity.

Importing this package is cheap on purpose: it runs at every interpreter
start (through the ``.pth`` shim), so nothing heavy is imported here.
"""

__version__ = "0.1.0"

# The mlx-lm releases whose internals the runtime shim knows. Newer minor
# releases are refused by the shim until they are checked.
SUPPORTED_MLX_LM = ((0, 32, 2), (0, 33, 0))

RANK_SCALING_CHOICES = ("constant", "by_bits", "by_kl")
RANK_BUDGET_CHOICES = ("free", "match")
