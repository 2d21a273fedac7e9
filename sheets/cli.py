"""The ``xlmirror`` command line: ``build`` the workbooks, ``check`` every formula."""

import argparse
import json
import logging
import sys

from engine.errors import InputError

log = logging.getLogger("xlmirror")

EXIT_USAGE = 2  # a user's mistake, the same code argparse uses for a bad option
EXIT_MISMATCH = 1


def build_command(args):
    from sheets.build import build

    build(args.out, args.ratings, seed=args.seed, force=args.force,
          download=not args.no_download, n_users=args.users, n_movies=args.movies)
    return 0


def check_command(args):
    from sheets.check import available_engines, check_workbook, format_report, report_dict

    engines, notes = available_engines()
    reports = []
    for path in args.files:
        log.info("checking %s with %s", path, " and ".join(engines))
        report = check_workbook(path, engines)
        report.notes.extend(notes)
        reports.append(report)
        if not args.json:
            print(format_report(report))

    if args.json:
        print(json.dumps([report_dict(report) for report in reports], indent=2))
    return 0 if all(report.ok for report in reports) else EXIT_MISMATCH


def make_parser():
    parser = argparse.ArgumentParser(
        prog="xlmirror",
        description="The fast.ai lesson 7 spreadsheets as generated, verified workbooks.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    build = commands.add_parser(
        "build", help="write entropy_example.xlsx and collab_filter.xlsx",
        description="Write the lecture's workbooks with live formulas, cached values and "
                    "Solver models. MovieLens 100K is found through --ratings, then "
                    "$XLMIRROR_DATA (a folder holding ml-100k/), then fastai's data folder, "
                    "and otherwise downloaded with fastai.",
    )
    build.add_argument("--ratings", metavar="DIR",
                       help="MovieLens 100K folder (holding u.data), or a folder holding ml-100k/")
    build.add_argument("--out", metavar="DIR", default="workbooks",
                       help="where to write the workbooks (default: workbooks)")
    build.add_argument("--seed", type=int, default=42,
                       help="seed for the starting factors (default: 42)")
    build.add_argument("--users", type=int, default=15,
                       help="most active users in the ratings block (default: 15)")
    build.add_argument("--movies", type=int, default=15,
                       help="most rated movies in the ratings block (default: 15)")
    build.add_argument("--force", action="store_true",
                       help="overwrite workbooks that were edited since xlmirror wrote them")
    build.add_argument("--no-download", action="store_true",
                       help="never download MovieLens; fail if it is not found locally")
    build.set_defaults(run=build_command)

    check = commands.add_parser(
        "check", help="recalculate every formula with two engines and compare with numpy",
        description="Recalculate every formula cell with the formulas package and with "
                    "LibreOffice headless, and compare each cell with its cached value and "
                    "with the numpy reference. Exits 1 when any cell differs by more than 1e-9.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="workbooks to check")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=check_command)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    _report_to_stderr(quiet=args.quiet)
    try:
        return args.run(args)
    except InputError as exc:
        print(f"xlmirror: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("xlmirror: interrupted", file=sys.stderr)
        return 130


def _report_to_stderr(quiet):
    # progress goes to stderr so stdout stays the report (and valid JSON with --json)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    sys.exit(main())
