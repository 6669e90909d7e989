"""`python -m ffiguard <command>`.

Commands are registered in COMMANDS: each is (name, help, add_arguments, run).
To add one (`run`, `doctor`, ...), write its two functions and append an entry;
run(args) returns the exit status. Command modules are imported only when the
command runs, so `--help` works even where the core cannot load.
"""

import argparse
import sys
from typing import List, Optional


# ---- demo ---------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=int, default=4, metavar="N",
                        help="native frames to show per fault (default 4)")


def _demo_run(args: argparse.Namespace) -> int:
    from ffiguard import demo

    return demo.run(n_frames=max(args.frames, 0))


COMMANDS = [
    ("demo", "run every kind of fault through a guarded call and show it caught",
     _demo_arguments, _demo_run),
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ffiguard",
        description="ffiguard: foreign calls that cannot crash Python.",
    )
    sub = p.add_subparsers(dest="command", metavar="command")
    for name, help_text, add_arguments, run in COMMANDS:
        cp = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(cp)
        cp.set_defaults(run=run)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
