"""Command line: ``bridge serve [options]`` and ``bridge make-tiny-model DIR``.

Bad values end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from bridge.config import OPTIONS, ConfigError, load_settings

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser for every sub-command; values stay raw strings and are validated by config."""
    parser = _Parser(
        prog="bridge", description="IM bots and WebSocket clients to an in-process VLM."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument(
        "--config", metavar="FILE", help="a TOML file of options (env BRIDGE_CONFIG)"
    )
    for opt in OPTIONS:
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if opt.switch else {}
        serve.add_argument(
            opt.flag,
            dest=opt.attr,
            metavar=opt.name.upper().replace("-", "_"),
            action="append" if opt.repeatable else "store",
            default=None,
            help=f"{opt.help} (env {opt.env}; default {opt.default!r})"
            if not opt.secret
            else f"{opt.help} (env {opt.env})",
            **extra,
        )
    tiny = sub.add_parser("make-tiny-model", help="write the built-in tiny model to DIR")
    tiny.add_argument("dir", metavar="DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bridge`` console script and ``python -m bridge``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "make-tiny-model":
        from engine.tiny import build_tiny_model

        path = build_tiny_model(args.dir)
        print(f"tiny model written to {path}")
        return 0
    if args.command != "serve":
        parser.print_help()
        return EXIT_USAGE
    flags = {opt.name: getattr(args, opt.attr) for opt in OPTIONS}
    try:
        settings = load_settings(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"bridge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from engine.loading import local_model_problem

    problem = local_model_problem(settings.model)
    if problem is not None:  # a missing folder is a config error, found before anything starts
        print(f"bridge: error: --model: {problem}", file=sys.stderr)
        return EXIT_USAGE

    from bridge.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    from bridge.app import serve

    try:
        return asyncio.run(serve(settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
