"""Commands on workbooks: ``build``, ``check`` and ``fit``."""

import json
import logging
import math
from pathlib import Path

from engine.errors import InputError

log = logging.getLogger("xlmirror")

EXIT_MISMATCH = 1  # check found a cell over the tolerance


def build_command(args):
    from sheets.build import build

    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")
    build(args.out, args.ratings, seed=args.seed, force=args.force,
          download=not args.no_download, n_users=args.users, n_movies=args.movies)
    return 0


def check_command(args):
    from cli.main import EXIT_USAGE, print_error  # here: cli.main imports this module
    from sheets.check import available_engines, check_workbook, format_report, report_dict

    engines, notes = available_engines()
    reports, unreadable = [], []
    for path in args.files:
        log.info("checking %s with %s", path, " and ".join(engines))
        try:
            report = check_workbook(path, engines)
        except InputError as exc:
            if len(args.files) == 1:
                raise
            # one bad file among several: say so and go on, the other reports still count
            print_error(exc)
            unreadable.append({"path": str(path), "ok": False, "error": str(exc)})
            continue
        report.notes.extend(notes)
        reports.append(report)
        if not args.json:
            print(format_report(report))

    if args.json:
        print(json.dumps([report_dict(report) for report in reports] + unreadable, indent=2))
    if unreadable:
        return EXIT_USAGE
    return 0 if all(report.ok for report in reports) else EXIT_MISMATCH


def fit_command(args):
    from sheets.fit import (
        check_output, check_plot_output, default_output, fit_problem, read_problem,
        solver_sheets, write_solution,
    )
    from sheets.reader import open_workbook

    if not (math.isfinite(args.wd) and args.wd >= 0):
        raise InputError(f"--wd must be a finite number, 0 or more; got {args.wd}")
    out = Path(args.out) if args.out else default_output(args.workbook)
    check_output(args.workbook, out, args.force)
    if args.plot:
        check_plot_output(args.plot, [args.workbook, out], args.force)
    wb = open_workbook(args.workbook)
    titles = [args.sheet] if args.sheet else solver_sheets(wb)
    if not titles:
        raise InputError(f"{args.workbook} has no sheet with a Solver model; nothing to fit")
    problems = [read_problem(wb, title) for title in titles]

    rows, solutions = [], {}
    for problem in problems:
        results = fit_problem(problem, args.engine, args.device, args.wd)
        best = min(results, key=lambda result: result.final_rmse)
        solutions[problem.sheet] = (problem, best.factors)
        rows.extend((problem.sheet, result, result is best) for result in results)
        for result in results:
            if result.converged is False:
                log.warning("%s: %s stopped after %d iterations without converging; its "
                            "RMSE may still be falling", problem.sheet, result.engine,
                            result.iterations)
    cached = write_solution(args.workbook, out, wb, solutions)
    log.info("wrote %s (the lowest final RMSE of each sheet, marked *)", out)

    if args.plot:
        from sheets.plots import save_rmse_plot

        save_rmse_plot(args.plot, rows)
        log.info("wrote %s", args.plot)
    if args.json:
        print(json.dumps({"out": str(out), "sheet_rmse": cached, "fits": [
            {"sheet": sheet, "engine": r.engine, "device": r.device,
             "start_rmse": r.start_rmse, "final_rmse": r.final_rmse,
             "iterations": r.iterations, "converged": r.converged, "seconds": r.seconds,
             "written": written}
            for sheet, r, written in rows]}, indent=2))
    else:
        print(_fit_table(rows))
    return 0


CONVERGED = {True: "yes", False: "no", None: "-"}  # None: a fixed number of steps (Adam)


def _fit_table(rows):
    lines = [f"{'sheet':<16}{'engine':<17}{'device':<8}{'start RMSE':>11}{'final RMSE':>12}"
             f"{'iterations':>12}{'converged':>11}{'seconds':>9}"]
    for sheet, r, written in rows:
        lines.append(f"{sheet:<16}{r.engine:<17}{r.device:<8}{r.start_rmse:>11.6f}"
                     f"{r.final_rmse:>12.6f}{r.iterations:>12d}{CONVERGED[r.converged]:>11}"
                     f"{r.seconds:>9.2f}{'  *' if written else ''}")
    return "\n".join(lines)


def register(commands):
    """Add ``build``, ``check`` and ``fit`` to the ``commands`` subparsers."""
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
                    "with the numpy reference. Exits 1 when any cell differs by more than 1e-9, "
                    "2 when a file cannot be read (the other files are still checked).",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="workbooks to check")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(run=check_command)

    fit = commands.add_parser(
        "fit", help="solve a sheet's Solver model with scipy and/or torch",
        description="Minimise each Solver model of WORKBOOK (the RMSE, by changing the factor "
                    "and bias cells) with scipy's L-BFGS-B and/or PyTorch, print the results "
                    "side by side, and write the best solution into a copy of the workbook "
                    "with its formulas live.",
    )
    fit.add_argument("workbook", metavar="WORKBOOK", help="an .xlsx with Solver models")
    fit.add_argument("--sheet", metavar="NAME",
                     help="fit only this sheet (default: every sheet with a Solver model)")
    fit.add_argument("--engine", choices=("scipy", "torch", "all"), default="all",
                     help="scipy L-BFGS-B, torch L-BFGS, or all (adds torch Adam; default)")
    fit.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="where torch runs (auto: CUDA when available)")
    fit.add_argument("--wd", type=float, default=1e-4,
                     help="L2 penalty wd/2*sum(p^2) added for every engine, so the optimum is "
                          "well defined (default: 1e-4; 0 minimises the RMSE alone, as Solver)")
    fit.add_argument("--out", metavar="FILE",
                     help="the solved copy (default: WORKBOOK-solved.xlsx beside it)")
    fit.add_argument("--force", action="store_true",
                     help="overwrite an existing --out or --plot file")
    fit.add_argument("--plot", metavar="PNG", help="save the RMSE of each iteration as a plot")
    fit.add_argument("--json", action="store_true", help="print the results as JSON")
    fit.set_defaults(run=fit_command)
