"""Per-module LoRA ranks for mlx-lm, chosen from quantization sensitivity.

Importing this package is cheap on purpose: it runs at every interpreter
start (through the ``.pth`` shim), so nothing heavy is imported here.
"""

__version__ = "0.1.0"
