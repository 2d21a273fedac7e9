"""``xlmirror``: the parser, logging to stderr, and one line (exit 2) for a user's mistake."""

import argparse
import logging
import sys
import warnings

from cli import movielens, paddy, workbooks
from engine.errors import InputError

log = logging.getLogger("xlmirror")

EXIT_USAGE = 2  # a user's mistake, the same code argparse uses for a bad option
COMMAND_MODULES = (workbooks, movielens, paddy)


def make_parser():
    parser = argparse.ArgumentParser(
        prog="xlmirror",
        description="fast.ai lesson 7 as software: the lecture's spreadsheets as verified "
                    "workbooks, their models fitted by scipy and torch, and the Paddy Doctor "
                    "image workflow with fastai.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    _report_to_stderr(quiet=args.quiet)
    # fastai's import calls torch.jit.script, which torch 2.9+ deprecates: a warning about
    # fastai's code that a user of this command can do nothing about
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\._script")
    try:
        return args.run(args)
    except InputError as exc:
        print_error(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("xlmirror: interrupted", file=sys.stderr)
        return 130


def print_error(exc):
    """A user's mistake as the one line every command prints for it."""
    print(f"xlmirror: error: {exc}", file=sys.stderr)


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is when a message is logged.

    A plain StreamHandler keeps the stream it was given; when ``main`` runs inside another
    program (a test runner, a notebook) that later swaps or closes stderr, it would write to a
    closed file.
    """

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _report_to_stderr(quiet):
    # progress goes to stderr so stdout stays the report (and valid JSON with --json)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
