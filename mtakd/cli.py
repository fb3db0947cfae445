"""`mtakd` command line: distill, cache-teacher, student, spans, evaluate, report, generate, trajectory, demo, objectives.

Each subcommand lives next to what it runs and registers itself through ``add_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import __version__


def main(argv: list[str] | None = None) -> int:
    from . import demo, distill, evaluate, generate, report, spans_cli, student_cli, teacher_cache, trajectory

    parser = argparse.ArgumentParser(prog="mtakd", description="Distil causal LMs with MTA on strong base objectives.")
    parser.add_argument("--version", action="version", version=f"mtakd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, distill, teacher_cache, student_cli, evaluate, generate, report, spans_cli, trajectory):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .errors import USER_ERRORS

    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:  # a message that already names the command (for library callers) names it once
        print(f"mtakd {args.command}: error: {str(e).removeprefix(f'{args.command}: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
