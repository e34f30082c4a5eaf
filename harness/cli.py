"""The ``repro`` command: data, launch, status, report, run."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from harness.errors import UserError


def _add_resources(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("resources (override the spec's)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--nodes", type=int)
    g.add_argument("--tasks-per-node", type=int)
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem-gb", type=int)
    g.add_argument("--timeout-min", type=int)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repro", description="ssl-repro: reproduce SSL papers' numbers")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make data sets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    tiny = data_sub.add_parser("tiny", help="write the tiny ImageFolder sets (digits, synthetic)")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--sets", nargs="+", default=["digits", "synthetic"])

    launch = sub.add_parser("launch", help="submit every stage of a matrix that has no finished record")
    launch.add_argument("spec", type=Path)
    launch.add_argument("--executor", choices=["local", "slurm"], default="local")
    launch.add_argument("--out", type=Path, help="run folder (default: the spec's 'out' or runs/<name>)")
    launch.add_argument("--dry-run", action="store_true", help="list what would be submitted")
    _add_resources(launch)

    status = sub.add_parser("status", help="cells x stages: pending/running/done/failed, job id, progress")
    status.add_argument("spec", type=Path)
    status.add_argument("--out", type=Path)

    report = sub.add_parser("report", help="markdown/CSV tables: reproduced vs paper")
    report.add_argument("spec", type=Path)
    report.add_argument("--out", type=Path)
    report.add_argument("--plot", action="store_true", help="also write gaps.png")

    run = sub.add_parser("run", help="run one stage in this process (debugging)")
    run.add_argument("spec", type=Path)
    run.add_argument("--cell", required=True, help="cell id (see 'repro status')")
    run.add_argument("--stage", default="pretrain")
    run.add_argument("--out", type=Path)

    sub.add_parser("methods", help="list methods, presets and evaluations")
    return parser


def _table(rows: list[dict]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers="keys", tablefmt="github") if rows else "(no cells)"


def _cmd_launch(args: argparse.Namespace) -> int:
    from harness.launch import launch
    from harness.matrix import expand

    matrix = expand(args.spec, args.out)
    res = {k: getattr(args, k) for k in ("partition", "account", "qos", "gpus_per_node", "nodes",
                                         "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min")}
    if args.dry_run:
        from harness.launch import check_executor, preflight
        from harness.records import is_done

        check_executor(args.executor)
        preflight(matrix, _say)  # what launch checks before submitting, without submitting

        rows = [{"stage": s.key, "method": s.method, "preset": s.preset, "seed": s.seed,
                 "done": is_done(s.stage_dir)} for s in matrix.stages()]
        print(_table(rows))
        return 0
    result = launch(matrix, args.executor, res, on_event=_say)
    print(f"{matrix.name}: submitted {len(result.submitted)}, already done {len(result.skipped_done)}, "
          f"still queued/running {len(result.skipped_active)}, failed {len(result.failed)} "
          f"(runs in {matrix.out})")
    for key, job in result.submitted.items():
        print(f"  submitted {key} -> job {job}")
    for key, err in result.failed.items():
        print(f"  FAILED {key}: {err}")
    return 1 if result.failed else 0


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.matrix import expand
    from harness.status import status_rows

    print(_table(status_rows(expand(args.spec, args.out))))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from harness.matrix import expand
    from harness.status import expected_rows
    from reports import (
        comparison_table,
        expected_frame,
        load_paper_numbers,
        load_records,
        to_markdown,
        write_report,
    )

    matrix = expand(args.spec, args.out)
    rows = expected_rows(matrix)
    table = comparison_table(expected_frame(rows), load_records(matrix.out), load_paper_numbers())
    write_report(table, matrix.out)
    print(to_markdown(table))
    print(f"\n(written to {matrix.out / 'report.md'} and {matrix.out / 'report.csv'})")
    if args.plot:
        from reports import plot_gaps

        plot_gaps(table, matrix.out / "gaps.png")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from harness.matrix import expand
    from harness.stages import run_stage

    matrix = expand(args.spec, args.out)
    for s in matrix.stages():
        if s.cell_id == args.cell and s.stage == args.stage:
            record = run_stage(s)  # a finished stage is not run again: its record is returned
            print(f"{s.key}: {record['status']} {record['metrics']}")
            return 0
    raise UserError("--cell", f"no stage {args.cell}/{args.stage} in {args.spec}", "see 'repro status SPEC'")


def _cmd_data(args: argparse.Namespace) -> int:
    from harness.tinydata import make_tiny

    for name, path in make_tiny(args.out, sets=tuple(args.sets)).items():
        print(f"{name}: {path}")
    return 0


def _cmd_methods(_: argparse.Namespace) -> int:
    from harness.api import EVALUATIONS, METHODS

    for name in METHODS.names():
        cls = METHODS.get(name)
        for pname, p in cls.presets.items():
            print(f"{name:10s} {pname:16s} {p.description}")
    print("evaluations:", ", ".join(EVALUATIONS.names()))
    return 0


COMMANDS = {"launch": _cmd_launch, "status": _cmd_status, "report": _cmd_report, "run": _cmd_run,
            "data": _cmd_data, "methods": _cmd_methods}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
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
