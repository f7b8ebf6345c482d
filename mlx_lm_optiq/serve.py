"""Many adapters resident on one base model: ``mlx_lm_optiq.serve``.

    mlx_lm_optiq.serve [--model M] --adapter math=./math --adapter chat=./chat \\
        [--adapter-dir ./adapters] [--max-adapters 16]

mlx-lm's OpenAI-compatible server (all its options work) with every named
adapter kept in memory; without ``--model`` the base model is the one the
first adapter's record names. A request picks one with ``"adapter": "math"`` (or
none for the base model); switching swaps LoRA layers in and out around the
shared base layers and never reloads weights (:mod:`.registry`). What each
request gets is :mod:`.serve_api`'s; mlx-lm's server is reached only through
:mod:`.mlx_lm_server`.
"""

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from ._cli import add_version, run_command
from .adapter_record import from_adapter_dir
from .errors import OptiqError
from .registry import AdapterRegistry


def _adapter_arg(text):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _count(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx_lm_optiq.serve",
        description="mlx-lm's OpenAI-compatible server with many LoRA adapters "
        "resident on one base model, chosen per request with the 'adapter' field. "
        "Every mlx_lm.server option is accepted too (see mlx_lm.server --help).",
        add_help=False,
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help")
    parser.add_argument(
        "--adapter",
        type=_adapter_arg,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter to keep resident (repeatable): ours, mlx-lm's, mlx-optiq's "
        "or PEFT's",
    )
    parser.add_argument(
        "--adapter-dir",
        metavar="DIR",
        help="allow POST /v1/adapters and DELETE /v1/adapters/NAME at runtime, for "
        "adapter directories that resolve (links followed) inside DIR; without "
        "it they answer 403",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=_count,
        default=8 * 1024 * 1024,
        metavar="N",
        help="the largest request body accepted (default 8 MiB); larger ones answer "
        "413 unread",
    )
    parser.add_argument(
        "--max-adapters",
        type=_count,
        metavar="N",
        help="at most N adapters resident; a POST beyond it answers 409 until one "
        "is deleted",
    )
    add_version(parser)
    return parser


def _model_given(rest: List[str]) -> Optional[str]:
    """mlx_lm.server's ``--model`` among the options passed on to it."""
    model = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    model.add_argument("--model")
    return model.parse_known_args(rest)[0].model


def base_model(args: argparse.Namespace, rest: List[str]) -> List[str]:
    """``rest`` with ``--model``: given, or the first adapter's base model."""
    if _model_given(rest):
        return rest
    name, path = args.adapter[0]
    try:
        base = from_adapter_dir(path).base_model
    except (OptiqError, OSError) as e:
        raise OptiqError(str(e), f"--adapter {name}={path}") from e
    if not base:
        raise OptiqError(
            "its record names no base model; give --model M", f"--adapter {name}={path}"
        )
    print(f"serving base model {base} (from adapter {name}'s record)", file=sys.stderr)
    return ["--model", base, *rest]


def start(args: argparse.Namespace, rest: List[str]) -> None:
    """Load the adapters given at start, then serve until stopped."""
    rest = base_model(args, rest)
    from . import mlx_lm_server  # checks the installed mlx-lm's server first

    if args.adapter_dir and not Path(args.adapter_dir).is_dir():
        raise OptiqError("not a directory", f"--adapter-dir {args.adapter_dir}")
    registry = AdapterRegistry(max_adapters=args.max_adapters)
    for name, path in args.adapter:
        try:
            registry.add(name, path, pinned=True)
        except (OptiqError, OSError) as e:
            raise OptiqError(str(e), f"--adapter {name}={path}") from e
    mlx_lm_server.serve(rest, registry, args.adapter_dir, args.max_request_bytes)


def main(argv: Optional[List[str]] = None) -> int:
    from . import _startup

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.help:
        from .mlx_lm_server import server_options_help

        parser.print_help()
        print(f"\noptions passed on to mlx_lm.server:\n{server_options_help()}")
        return 0
    if _startup.disabled():
        print(
            f"error: {_startup.DISABLE_ENV} is set, and serving adapters of mixed "
            "ranks needs the plugin; unset it, or serve stock adapters with "
            "mlx_lm.server",
            file=sys.stderr,
        )
        return 2
    if not args.adapter and not _model_given(rest):
        parser.error(
            "no model to serve: give --model M (the base model), or --adapter "
            "NAME=PATH for an adapter whose record names its base model"
        )
    return run_command(lambda a: start(a, rest), args)


if __name__ == "__main__":
    sys.exit(main())
