"""``python -m mlx_lm_optiq``: the commands, or one of them by name.

python -m mlx_lm_optiq                   lists them
python -m mlx_lm_optiq info ADAPTER      runs mlx_lm_optiq.info, like mlx_lm_optiq.info ADAPTER
"""

import importlib
import sys

from ._cli import version_line

# command -> what it does (each is also the console script mlx_lm_optiq.<command>)
COMMANDS = {
    "info": "show what an adapter directory holds (ranks, budget, PEFT or mlx-lm)",
    "sensitivity": "measure each module's KL when quantized, for by_kl and quantize",
    "quantize": "mixed-precision quantization under a bits-per-weight budget",
    "export": "a clean PEFT copy, or a uniform-rank copy stock mlx-lm loads",
    "serve": "mlx-lm's server with many adapters resident, chosen per request",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: python -m mlx_lm_optiq COMMAND [ARGS]   (or: mlx_lm_optiq.COMMAND ARGS)",
        "",
        "Training is mlx-lm's own: mlx_lm.lora --rank-scaling ... (see mlx_lm.lora --help).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()),
        "",
        "mlx_lm_optiq.COMMAND --help says more; --version prints the versions.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(version_line("mlx_lm_optiq"))
        return 0
    if argv[0] not in COMMANDS:
        print(f"{usage()}\n\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    command = importlib.import_module(f"mlx_lm_optiq.{argv[0]}")
    return command.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
