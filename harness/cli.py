"""The ``repro`` command: data, launch, status, report, run."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path

from harness.errors import UserError


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (override the spec's 'resources:' for every stage)")
    g.add_argument("--partition", help="SLURM partition")
    g.add_argument("--account", help="SLURM account")
    g.add_argument("--qos", help="SLURM quality of service")
    g.add_argument("--gpus-per-node", type=int, help="GPUs per node (one task per GPU)")
    g.add_argument("--nodes", type=int, help="nodes per job (SLURM only)")
    g.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per process (data-loading workers)")
    g.add_argument("--mem-gb", type=int, help="memory per node in GB (SLURM only)")
    g.add_argument("--timeout-min", type=int, help="time limit per job in minutes (a preempted job resumes)")


def _add_matrix(p: argparse.ArgumentParser, verb: str) -> None:
    p.add_argument("spec", type=Path, help="the matrix spec (YAML): methods x presets x seeds x evaluations")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"settings applied to every experiment on top of its 'overrides:' (e.g. epochs=2); "
                        f"part of the cell identity, so {verb} needs the same ones as the launch")
    p.add_argument("--out", type=Path, help="run folder (default: the spec's 'out' or runs/<name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description="ssl-repro: reproduce SSL papers' numbers")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make data sets", description="make data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SET")
    tiny = data_sub.add_parser("tiny", help="write the tiny data sets (ImageFolder: digits, synthetic; dense: "
                                            "ade20k, coco)")
    tiny.add_argument("--out", required=True, type=Path, help="folder that receives one folder per set")
    tiny.add_argument("--sets", nargs="+", default=["digits", "synthetic"],
                      help="which sets to write (default: digits synthetic; ade20k and coco, in their datasets' "
                           "layouts, for the dense evaluations)")

    launch = sub.add_parser("launch", help="submit every stage of a matrix that has no finished record",
                            description="Submit every stage (pre-training, then its evaluations) that has no "
                                        "finished record and is not already queued or running.")
    _add_matrix(launch, "status/report")
    launch.add_argument("--executor", choices=["local", "slurm"], default="local",
                        help="local: stages run one after another in subprocesses on this machine; slurm: "
                             "job arrays on a SLURM cluster (default: local)")
    launch.add_argument("--dry-run", action="store_true", help="list what would be submitted; submit nothing")
    launch.add_argument("--snapshot", action=argparse.BooleanOptionalAction, default=None,
                        help="run the jobs from a frozen copy of the code under <run folder>/code/<hash>, so "
                             "later edits cannot change a queued job (default: the spec's 'snapshot:', else on "
                             "for slurm, off for local)")
    launch.add_argument("--hold", action="store_true", help="submit the SLURM jobs held: they wait until "
                                                            "'scontrol release JOBID'")
    _add_resources(launch)

    status = sub.add_parser("status", help="cells x stages: pending/running/done/failed, job id, progress")
    _add_matrix(status, "status")

    report = sub.add_parser("report", help="markdown/CSV tables: reproduced vs paper")
    _add_matrix(report, "report")
    report.add_argument("--plot", action="store_true", help="also write gaps.png")
    report.add_argument("--code-hash", action="store_true",
                        help="add a 'code' column: the code hash of each row's records (+dirty: uncommitted "
                             "changes ran)")

    run = sub.add_parser("run", help="run one stage in this process (debugging)")
    _add_matrix(run, "run")
    run.add_argument("--cell", required=True, help="cell id (see 'repro status')")
    run.add_argument("--stage", default="pretrain",
                     help="which stage of the cell: pretrain (init for a random-init floor cell) or an evaluation name")

    methods = sub.add_parser("methods", help="list methods, presets and evaluations; or show a preset's values",
                             description="Without arguments: every method, preset and evaluation. With METHOD: "
                                         "its presets. With METHOD PRESET: every resolved value, where it comes "
                                         "from, and which ones differ from the paper recipe.")
    methods.add_argument("method", nargs="?", help="a method name (see 'repro methods')")
    methods.add_argument("preset", nargs="?", help="one of the method's presets")
    return parser


def _table(rows: list[dict]) -> str:
    from tabulate import tabulate

    # disable_numparse: guessing each cell's type costs seconds over a 10,000-stage matrix
    return tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else "(no cells)"


def _expand(args: argparse.Namespace):
    from harness.matrix import expand, parse_overrides

    return expand(args.spec, args.out, parse_overrides(args.overrides))


def _load_run(args: argparse.Namespace):
    """The launched matrix from its manifest (no torch); with KEY=VALUE overrides, the spec expanded anew."""
    from harness.manifest import load_run

    if args.overrides:
        from harness.manifest import run_from_matrix
        from harness.matrix import load_spec

        matrix = _expand(args)
        return run_from_matrix(matrix, load_spec(matrix.spec_path))
    return load_run(args.spec, args.out)


def _cmd_launch(args: argparse.Namespace) -> int:
    from harness.launch import launch

    matrix = _expand(args)
    res = {k: getattr(args, k) for k in ("partition", "account", "qos", "gpus_per_node", "nodes",
                                         "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min", "hold")}
    if args.hold and args.executor != "slurm":
        raise UserError("--hold", "only SLURM jobs can be held", "use --executor slurm")
    if args.dry_run:
        from harness.launch import check_executor, preflight
        from harness.records import is_done

        check_executor(args.executor)
        preflight(matrix, _say)  # what launch checks before submitting, without submitting

        rows = [{"stage": s.key, "method": s.method, "preset": s.preset, "seed": s.seed,
                 "done": is_done(s.stage_dir)} for s in matrix.stages()]
        if args.overrides:
            print("overrides on every experiment:", " ".join(args.overrides))
        print(_table(rows))
        return 0
    result = launch(matrix, args.executor, res, args.snapshot, on_event=_say)
    if result.snapshot is not None:
        print(result.snapshot.describe())
    print(f"{matrix.name}: submitted {len(result.submitted)}, already done {len(result.skipped_done)}, "
          f"still queued/running {len(result.skipped_active)}, failed {len(result.failed)} "
          f"(runs in {matrix.out})")
    if result.other_code:
        print(f"  {len(result.other_code)} of the finished stages were computed by other code than this launch's "
              f"(code {result.code_hash}); they are kept, as a stage's identity is its configuration: "
              f"'repro report {args.spec} --code-hash' shows each row's code")
    for key, job in result.submitted.items():
        print(f"  submitted {key} -> job {job}")
    for key, err in result.failed.items():
        print(f"  FAILED {key}: {err}")
    return 1 if result.failed else 0


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.status import status_rows

    print(_table(status_rows(_load_run(args))))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    # The run's manifest, its records and the paper numbers only: no torch, no plugins, no sacct.
    from harness.status import expected_rows
    from reports import (
        RECORD_FIELDS,
        check_expected,
        comparison_table,
        load_paper_numbers,
        read_records,
        to_markdown,
        with_code_column,
        write_report,
    )

    run = _load_run(args)
    records, damaged = read_records(run.out, [os.path.join(s["stage_dir"], "record.json") for s in run.stages],
                                    RECORD_FIELDS, run.out / "launch" / "records_index.json")
    rows = check_expected(expected_rows(run, set(damaged)))
    table = comparison_table(rows, records, load_paper_numbers(), run.settings.tolerance, run.settings.confidence)
    if args.code_hash:
        table = with_code_column(table, rows, records)
    try:
        write_report(table, run.out, run.name)
    except ValueError as e:
        raise UserError("--out", str(e), "pass that report's own spec, or another --out") from None
    print(to_markdown(table))
    print(f"\n(written to {run.out / 'report.md'} and {run.out / 'report.csv'})")
    if args.plot:
        from reports.plots import plot_gaps

        png = plot_gaps(table, run.out / "gaps.png")
        print(f"(plot: {png})" if png else "(no plot: no row has both our number and a comparable paper number)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.stages import run_stage

    matrix = _expand(args)
    for s in matrix.stages():
        if s.cell_id == args.cell and (s.stage == args.stage or (s.builds and args.stage == "pretrain")):
            record = run_stage(s)  # a finished stage is not run again: its record is returned
            print(f"{s.key}: {record['status']} {record['metrics']}")
            return 0
    raise UserError("--cell", f"no stage {args.cell}/{args.stage} in {args.spec}", "see 'repro status SPEC'")


def _cmd_data(args: argparse.Namespace) -> int:
    from harness.tinydata import make_tiny

    for name, path in make_tiny(args.out, sets=tuple(args.sets)).items():
        print(f"{name}: {path}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from harness.api import EVALUATIONS, METHODS

    if args.method:
        from harness.presets import describe_method, preset_rows

        cls = METHODS.get(args.method, "method")
        if not args.preset:
            print(describe_method(cls))
            return 0
        header, rows = preset_rows(cls, args.preset)
        print(header)
        print(_table(rows))
        return 0
    for name in METHODS.names():
        cls = METHODS.get(name)
        for pname, p in cls.presets.items():
            print(f"{name:10s} {pname:16s} {p.description}")
    print("evaluations:", ", ".join(EVALUATIONS.names()))
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A skipped damaged file is news for the user, not a source line of ours.
    print(f"warning: {message}", file=file or sys.stderr)


COMMANDS = {"launch": _cmd_launch, "status": _cmd_status, "report": _cmd_report, "run": _cmd_run,
            "data": _cmd_data, "methods": _cmd_methods}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also come after options (argparse takes one run of positionals only).
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with warnings.catch_warnings():  # restores the caller's warning display afterwards
            warnings.showwarning = _one_line_warning
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return code
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except OSError as e:  # a run folder that cannot be written, a full disk: the fix is the user's
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOSPC, errno.ENOTDIR, errno.EDQUOT):
            raise
        print(f"error: {e.filename or ''}: {e.strerror} (while running 'repro {args.command}'); "
              "choose a writable run folder (--out) or free space there", file=sys.stderr)
        return 2


def _closed_pipe() -> int:
    """`repro ... | head`: the reader left. Later writes (and the exit flush) must not raise again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    print("error: output: the pipe was closed before all output was written (e.g. '| head'); "
          "redirect to a file ('> out.txt') to keep all of it", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
