"""gpuctl entry point: argument parsing and error reporting; the work is in commands.py."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from gpulease import __version__
from gpulease.cli import commands, run
from gpulease.cli.config import DEFAULT_TIMEOUT_S, ENV_COORDINATOR, resolve
from gpulease.cli.devconfig import MAX_GPUS_PER_NODE, MAX_NODES
from gpulease.client import DEFAULT_TARGET
from gpulease.errors import GpuLeaseError

PROG = "gpuctl"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, e.g. 10 or 2.5, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before and after the command; the copies on subcommands use SUPPRESS so they
    # only set a value when given and do not overwrite one given before the command.
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=argparse.SUPPRESS if suppress else None,
        help=f"coordinator address(es), tried in order (default: ${ENV_COORDINATOR} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS if suppress else DEFAULT_TIMEOUT_S,
        help=f"deadline of each request to a coordinator (default: {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and allocate GPUs of a gpulease cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: commands.Handler, summary: str, *, remote: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        if remote:  # talks to a coordinator and prints what it says
            _add_global_options(p, suppress=True)
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(handler=handler)
        return p

    command("status", commands.status, "free/total GPUs, CPUs and memory per node")
    command("nodes", commands.nodes, "each node's address, GPUs, CPUs, memory and labels")

    p = command("allocs", commands.allocs, "live allocations")
    p.add_argument("--node", default="", help="only allocations on this node")
    p.add_argument("--owner", default="", help="only allocations of this owner")

    p = command("allocate", commands.allocate, "allocate GPUs on one node (held until released or TTL)")
    # Counts are not range-checked here: the coordinator does it, so API and CLI messages agree.
    p.add_argument("--gpus", type=int, required=True, metavar="N")
    p.add_argument("--cpus", type=int, metavar="N", help="default: the coordinator's per-GPU default")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 16GiB (default: the coordinator's)")
    p.add_argument("--gpu-model", default="", metavar="MODEL", help="exact GPU model name")
    p.add_argument("--min-gpu-memory", metavar="SIZE", help="least memory per GPU, e.g. 40GiB")
    p.add_argument(
        "--selector",
        type=_label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node label that must match (repeatable)",
    )
    p.add_argument("--ttl", metavar="DURATION", help="lease TTL, e.g. 60s, 5m (default: 60s)")
    p.add_argument("--owner", default="", help="who holds the allocation (free text)")
    p.add_argument("--request-id", metavar="ID", help="idempotency key (default: a fresh one)")

    p = command("release", commands.release, "release an allocation")
    p.add_argument("id", metavar="ID")

    p = command("cordon", commands.cordon, "stop placing new allocations on a node")
    p.add_argument("node", metavar="NODE")
    p = command("uncordon", commands.uncordon, "let a cordoned node take allocations again")
    p.add_argument("node", metavar="NODE")

    p = command("run", run.run, "allocate, run a container on the GPUs, stream its logs, release")
    p.add_argument("--gpus", type=int, required=True, metavar="N")
    p.add_argument("--cpus", type=int, metavar="N", help="default: the coordinator's per-GPU default")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 16GiB (default: the coordinator's)")
    p.add_argument("--gpu-model", default="", metavar="MODEL", help="exact GPU model name")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container env (repeatable)")
    p.add_argument("--volume", action="append", default=[], metavar="SRC:DST[:ro]", help="bind mount (repeatable)")
    p.add_argument("--shm-size", metavar="SIZE", help="size of /dev/shm, e.g. 8GiB")
    p.add_argument("--ttl", metavar="DURATION", help="lease TTL, kept alive while running (default: 60s)")
    p.add_argument("--owner", default="", help="who holds the allocation (default: gpuctl-run:$USER)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments")

    p = command("logs", run.logs, "print a container's logs")
    p.add_argument("id", metavar="ALLOCATION_ID")
    p.add_argument("--container", default="", metavar="ID", help="container id (default: the allocation's)")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the container exits")

    p = command("dev", commands.dev, "run a local coordinator, etcd and simulated agents", remote=False)
    p.add_argument("--nodes", type=_int_between(1, MAX_NODES), default=2, metavar="N")
    p.add_argument("--gpus-per-node", type=_int_between(0, MAX_GPUS_PER_NODE), default=8, metavar="N")
    p.add_argument("--port", type=_int_between(1, 65535), default=50051, help="coordinator port")
    p.add_argument("--data-dir", metavar="DIR", help="state directory (default: chosen by the dev cluster)")
    p.add_argument("--demo", action="store_true", help="also run a short demo workload")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # Usage errors (2), --help and --version (0): argparse has printed the message already.
        return e.code if isinstance(e.code, int) else 2
    try:
        config = resolve(args.coordinator, args.timeout, os.environ)
    except ValueError as e:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    handler: commands.Handler = args.handler
    try:
        return handler(config, args)
    except GpuLeaseError as e:
        print(f"{PROG}: error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Reader went away (gpuctl allocs | head): silence the flush at exit, too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
