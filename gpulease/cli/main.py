"""gpuctl entry point: argument parsing and error reporting; the work is in commands.py.

Exit codes (also in `gpuctl --help` and README.md):

    0    success
    1    the request failed (the reason is on stderr)
    2    usage or configuration error (bad flags, unreadable --ca/--cert/--key/--token-file)
    3    UNAUTHENTICATED: no credential, or one the coordinator does not accept (unknown,
         revoked or expired token; a certificate it does not trust)
    4    PERMISSION_DENIED: the credential is valid but lacks the right; the reason names the rule
    130  interrupted (Ctrl-C); `gpuctl run` also 143 on SIGTERM, and the container's own exit
         code once the container ran
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from gpulease import __version__
from gpulease.cli import certs, commands, run
from gpulease.cli.config import (
    DEFAULT_TIMEOUT_S,
    ENV_CA,
    ENV_CERT,
    ENV_COORDINATOR,
    ENV_KEY,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    CliConfig,
    resolve,
)
from gpulease.cli.devconfig import MAX_GPUS_PER_NODE, MAX_NODES
from gpulease.cli.output import client_log_to_stderr
from gpulease.client import DEFAULT_TARGET
from gpulease.client.models import EVENT_TYPES
from gpulease.common.identity import ROLE_NAMES
from gpulease.errors import GpuLeaseError, PermissionDenied, Unauthenticated

PROG = "gpuctl"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAUTHENTICATED = 3
EXIT_PERMISSION_DENIED = 4
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_FAILED}    the request failed (the reason is on stderr)
  {EXIT_USAGE}    usage or configuration error
  {EXIT_UNAUTHENTICATED}    UNAUTHENTICATED: no credential, or one the coordinator does not accept
  {EXIT_PERMISSION_DENIED}    PERMISSION_DENIED: valid credential without the right (the reason names the rule)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); gpuctl run: 143 on SIGTERM, else the container's exit code

credentials (flags beat the environment):
  --ca FILE            ${ENV_CA}           CA certificate that verifies the coordinator (TLS)
  --token-file FILE    ${ENV_TOKEN_FILE}   file holding a bearer token
                       ${ENV_TOKEN}        the token itself (prefer a file: environments leak)
  --cert/--key FILE    ${ENV_CERT}/${ENV_KEY}   client certificate and key (mutual TLS)
"""

LocalHandler = Callable[[argparse.Namespace], int]


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


def _model_quota(text: str) -> tuple[str, int]:
    model, sep, count = text.rpartition("=")
    if not sep or not model:
        raise argparse.ArgumentTypeError(f"expected MODEL=N (the model's exact name), got {text!r}")
    try:
        return model, int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MODEL=N with a whole number N, got {text!r}") from None


def _add_global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before and after the command; the copies on subcommands use SUPPRESS so they
    # only set a value when given and do not overwrite one given before the command.
    def unset(default: object) -> object:
        return argparse.SUPPRESS if suppress else default

    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT[,HOST:PORT...]",
        default=unset(None),
        help=f"coordinator address(es), tried in order (default: ${ENV_COORDINATOR} or {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=unset(DEFAULT_TIMEOUT_S),
        help=f"deadline of each request to a coordinator (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--ca",
        metavar="FILE",
        default=unset(None),
        help=f"CA certificate to verify the coordinator with (TLS; ${ENV_CA})",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        default=unset(None),
        help=f"file holding the bearer token (${ENV_TOKEN_FILE}; the token itself: ${ENV_TOKEN})",
    )
    parser.add_argument(
        "--cert", metavar="FILE", default=unset(None), help=f"client certificate for mutual TLS (${ENV_CERT})"
    )
    parser.add_argument("--key", metavar="FILE", default=unset(None), help=f"its private key (${ENV_KEY})")


def _add_tenant_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", default="", help="the tenant whose quota it counts against (default: your own; "
                                                "another tenant: admins only)")  # fmt: skip
    p.add_argument("--preemptible", action="store_true",
                   help="may be preempted for a request of a higher priority class (or reclaimed by a tenant "
                        "below its quota)")  # fmt: skip


def _add_tenant_or_default(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("tenant", nargs="?", metavar="TENANT", help="the tenant ('*': the default quota)")
    which.add_argument("--default", action="store_true",
                       help="the default quota, of tenants without their own (same as TENANT '*')")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect and allocate GPUs of a gpulease cluster.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def group(name: str, summary: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        p = sub.add_parser(name, help=summary, description=summary)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    def command(
        name: str,
        handler: commands.Handler,
        summary: str,
        *,
        within: argparse._SubParsersAction[argparse.ArgumentParser] | None = None,
        json: bool = True,
    ) -> argparse.ArgumentParser:
        """A command that talks to a coordinator and prints what it says."""
        p = (within or sub).add_parser(name, help=summary, description=summary)
        _add_global_options(p, suppress=True)
        if json:
            p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(handler=handler, local=None)
        return p

    def group_with_default(
        name: str, handler: commands.Handler, summary: str
    ) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        """A group whose name alone runs ``handler`` (`gpuctl quota` lists, as `gpuctl quota list`)."""
        p = sub.add_parser(name, help=summary, description=summary)
        _add_global_options(p, suppress=True)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(handler=handler, local=None)
        return p.add_subparsers(dest=f"{name}_command", metavar="COMMAND")

    def list_command(
        name: str, handler: commands.Handler, summary: str, within: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> None:
        """The listing of a group_with_default; its --json keeps one given before it (`quota --json list`)."""
        p = command(name, handler, summary, within=within, json=False)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of a table")

    def local(
        name: str, handler: LocalHandler, summary: str, within: argparse._SubParsersAction[argparse.ArgumentParser]
    ) -> argparse.ArgumentParser:
        """A command that works on this machine alone (no coordinator settings needed)."""
        p = within.add_parser(name, help=summary, description=summary)
        p.set_defaults(local=handler)
        return p

    command("status", commands.status, "free/total GPUs, CPUs and memory per node")
    command("nodes", commands.nodes, "each node's address, GPUs, CPUs, memory and labels")

    p = command("allocs", commands.allocs, "live allocations")
    p.add_argument("--node", default="", help="only allocations on this node")
    p.add_argument("--owner", default="", help="only allocations of this owner")

    p = command("allocate", commands.allocate, "allocate GPUs on one node, or a gang on several (held until "
                                               "released or TTL)")  # fmt: skip
    # Counts are not range-checked here: the coordinator does it, so API and CLI messages agree.
    p.add_argument("--gpus", "--gpus-per-node", dest="gpus", type=int, required=True, metavar="N",
                   help="GPUs (per node with --nodes)")  # fmt: skip
    p.add_argument("--nodes", type=int, default=0, metavar="N", help="a gang of N distinct nodes, each with --gpus-per-"
                   "node GPUs, --cpus and --memory, made whole or not at all under one lease")  # fmt: skip
    p.add_argument(
        "--same", default="", metavar="LABEL", help="a gang's nodes all share this label's value (e.g. rack)"
    )
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
    p.add_argument("--wait", metavar="DURATION", help="when nothing fits now, wait in the queue up to this long "
                                                      "(e.g. 10m), printing why it waits on stderr")  # fmt: skip
    p.add_argument("--max-runtime", metavar="DURATION", help="declared runtime: not renewed past it; lets it start "
                                                             "ahead of bigger requests it will not delay")  # fmt: skip
    p.add_argument("--priority", default="", metavar="CLASS", help="priority class (default: the cluster's)")
    _add_tenant_options(p)

    command("queue", commands.queue, "pending requests: position, tenant, priority, age and why each waits")

    p = command("release", commands.release, "release an allocation")
    p.add_argument("id", metavar="ID")

    p = command("cordon", commands.cordon, "stop placing new allocations on a node")
    p.add_argument("node", metavar="NODE")
    p = command("uncordon", commands.uncordon, "let a cordoned node take allocations again")
    p.add_argument("node", metavar="NODE")

    node = group("node", "manage node records (admin)")
    p = command("delete", commands.node_delete, "remove a node record no live allocation uses", within=node)
    p.add_argument("node", metavar="NODE")

    p = command("run", run.run, "allocate, run a container on the GPUs, stream its logs, release")
    p.add_argument("--gpus", type=int, required=True, metavar="N")
    p.add_argument("--cpus", type=int, metavar="N", help="default: the coordinator's per-GPU default")
    p.add_argument("--memory", metavar="SIZE", help="e.g. 16GiB (default: the coordinator's)")
    p.add_argument("--gpu-model", default="", metavar="MODEL", help="exact GPU model name")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="container env (repeatable)")
    p.add_argument("--volume", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="a host directory the server allows, read-only (SRC:DST:ro), or your tenant's writable "
                        "volume t-<tenant>-<name> (repeatable)")  # fmt: skip
    p.add_argument("--shm-size", metavar="SIZE", help="size of /dev/shm, e.g. 8GiB")
    p.add_argument("--ttl", metavar="DURATION", help="lease TTL, kept alive while running (default: 60s)")
    p.add_argument("--owner", default="", help="who holds the allocation (default: gpuctl-run:$USER)")
    _add_tenant_options(p)
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments")

    p = command("logs", run.logs, "print a container's logs")
    p.add_argument("id", metavar="ALLOCATION_ID")
    p.add_argument("--container", default="", metavar="ID", help="container id (default: the allocation's)")
    p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the container exits")

    command("whoami", commands.whoami, "who the coordinator takes you for: principal, role, tenant, how identified")

    token = group("token", "bearer tokens (admin): create, list, revoke")
    p = command("create", commands.token_create, "create a token and print it, alone, on stdout (shown once)",
                within=token, json=False)  # fmt: skip
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", required=True, choices=ROLE_NAMES)
    p.add_argument("--tenant", default="", help="what quotas count it under (default: the token's name)")
    p.add_argument("--expires", metavar="DURATION", help="lifetime, e.g. 12h or 30d (default: never expires)")
    command("list", commands.token_list, "tokens, without their secrets", within=token)
    p = command("revoke", commands.token_revoke, "revoke a token: it stops working at once", within=token)
    p.add_argument("name", metavar="NAME")

    quota = group_with_default("quota", commands.quota_list, "tenant quotas: list (the default), set, delete")
    p = command("set", commands.quota_set, "set a tenant's quota (admin), replacing the one it had; unset "
                "limits are unlimited", within=quota)  # fmt: skip
    _add_tenant_or_default(p)
    p.add_argument("--gpus", type=int, metavar="N", help="nominal GPUs overall")
    p.add_argument("--model", type=_model_quota, action="append", default=[], metavar="MODEL=N",
                   help="nominal GPUs of one model, by its exact name (repeatable)")  # fmt: skip
    p.add_argument("--borrow", type=int, default=0, metavar="N",
                   help="GPUs it may use above nominal out of idle capacity (reclaimable; default: 0)")  # fmt: skip
    p.add_argument("--cpus", type=int, metavar="N", help="cap on reserved CPUs")
    p.add_argument("--memory", metavar="SIZE", help="cap on reserved memory, e.g. 64GiB")
    p.add_argument("--lifetime", metavar="DURATION", help="an allocation is not renewed past this age, e.g. 24h")
    p.add_argument("--weight", type=float, default=0.0, metavar="W",
                   help="fair-share weight (default: the nominal GPUs, or 1 without them)")  # fmt: skip
    list_command("list", commands.quota_list, "each tenant's quota, usage, borrowed GPUs, pending requests and "
                 "fair-share GPU-hours", within=quota)  # fmt: skip
    p = command("delete", commands.quota_delete, "remove a tenant's quota (admin)", within=quota)
    _add_tenant_or_default(p)

    reservation = group_with_default("reservation", commands.reservation_list, "calendar reservations: list (the "
                                     "default), create, delete")  # fmt: skip
    p = command("create", commands.reservation_create, "hold GPUs for one tenant over a time window (admin): other "
                "tenants are not placed on them meanwhile", within=reservation)  # fmt: skip
    p.add_argument("name", metavar="NAME")
    p.add_argument("--tenant", required=True, help="the tenant the GPUs are held for")
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="GPUs to hold")
    p.add_argument("--nodes", default="", metavar="A,B", help="on these nodes (default: the coordinator picks the "
                   "best fit, fewest nodes)")  # fmt: skip
    p.add_argument("--model", default="", metavar="MODEL", help="GPUs of this model (exact name; default: any)")
    p.add_argument("--start", default="now", metavar="TIME", help="ISO-8601 (2026-12-01T18:00Z, UTC without a zone), "
                   "'now' or +DURATION (+2h); default: now")  # fmt: skip
    p.add_argument("--end", required=True, metavar="TIME", help="as --start, e.g. +8h or 2026-12-02T06:00Z")
    list_command("list", commands.reservation_list, "reservations: tenant, GPUs per node, window, whether active now",
                 within=reservation)  # fmt: skip
    p = command("delete", commands.reservation_delete, "remove a reservation (admin)", within=reservation)
    p.add_argument("name", metavar="NAME")

    priority = group_with_default("priority", commands.priority_list, "priority classes: list (the default), set, "
                                  "delete")  # fmt: skip
    p = command("set", commands.priority_set, "define or change a priority class (admin)", within=priority)
    p.add_argument("name", metavar="NAME")
    p.add_argument("value", type=int, metavar="VALUE", help="higher goes first and may preempt lower")
    p.add_argument("--default", action="store_true", help="the class of requests that name none")
    p.add_argument("--grace", metavar="DURATION", help="a preempted allocation of this class runs this long "
                                                       "after notice, e.g. 30s (default: 30s)")  # fmt: skip
    p.add_argument("--min-runtime", metavar="DURATION", help="never preempted younger than this, e.g. 10m")
    list_command("list", commands.priority_list, "the priority classes, highest first", within=priority)
    p = command("delete", commands.priority_delete, "remove a priority class set with `priority set` (admin)",
                within=priority)  # fmt: skip
    p.add_argument("name", metavar="NAME")

    p = command("top", commands.top, "a live view of the cluster, like htop: nodes, GPUs with utilization and "
                "holder, redrawn in place until Ctrl-C", json=False)  # fmt: skip
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh period (default: 2)")
    p.add_argument("--once", action="store_true", help="print one frame (no escape codes) and exit")

    p = command("events", commands.events, "cluster events (allocated, released, expired, node up/down, ...), "
                "oldest first; one line each, or one JSON object per line with --json")  # fmt: skip
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events as they happen")
    p.add_argument("--since", type=_int_between(0, 2**62), default=0, metavar="REV",
                   help="only events after this etcd revision (default: all the coordinator keeps)")  # fmt: skip
    p.add_argument("--type", action="append", default=[], metavar="T", dest="types",
                   help="only this event type (repeatable): " + ", ".join(EVENT_TYPES))  # fmt: skip

    p = command("audit", commands.audit, "read the audit log, oldest first (admin)")
    p.add_argument("--since", metavar="DURATION", help="only entries of the last DURATION, e.g. 1h (default: all kept)")
    p.add_argument("--actor", default="", metavar="NAME", help="only this actor, as the log names it: user:alice")
    p.add_argument("--limit", type=_int_between(1, 100_000), metavar="N", help="the newest N entries (default: 1000)")

    certs_cmds = group("certs", "make a development CA and certificates (files only; no coordinator)")
    p = local("init", certs.init, "create a development CA: DIR/ca.pem and DIR/ca.key (0600)", certs_cmds)
    p.add_argument("--dir", required=True, metavar="DIR", help="where the CA lives")
    p.add_argument("--days", type=_int_between(1, 36500), default=3650, help="validity (default: 3650)")
    issue = certs_cmds.add_parser("issue", help="issue a certificate signed by the CA in --dir",
                                  description="issue a certificate signed by the CA in --dir")  # fmt: skip
    kinds = issue.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, what in (("coordinator", "NAME"), ("agent", "NODE")):
        p = local(kind, certs.issue, f"a {kind}'s certificate (server and client use)", kinds)
        p.add_argument("name", metavar=what)
        p.add_argument(
            "--host",
            action="append",
            default=[],
            metavar="HOST",
            help="DNS name or IP address it is reached at (repeatable; loopback is always added)",
        )
    p = local("user", certs.issue, "a user's certificate (client use) with a role and a tenant", kinds)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=ROLE_NAMES, default="user", help="default: user")
    p.add_argument("--tenant", default="", help="what quotas count the user under (default: the user's name)")
    for p in kinds.choices.values():
        p.add_argument("--dir", required=True, metavar="DIR", help="the CA's directory; the files are written there")
        p.add_argument("--days", type=_int_between(1, 36500), default=365, help="validity (default: 365)")

    p = sub.add_parser("dev", help="run a local coordinator, etcd and simulated agents",
                       description="run a local coordinator, etcd and simulated agents")  # fmt: skip
    p.set_defaults(local=commands.dev)
    p.add_argument("--nodes", type=_int_between(1, MAX_NODES), default=2, metavar="N")
    p.add_argument("--gpus-per-node", type=_int_between(0, MAX_GPUS_PER_NODE), default=8, metavar="N")
    p.add_argument("--port", type=_int_between(1, 65535), default=50051, help="coordinator port")
    p.add_argument("--http-port", type=_int_between(1, 65535), default=8080,
                   help="the coordinator's HTTP port: /metrics, /healthz, /readyz (default 8080)")  # fmt: skip
    p.add_argument("--data-dir", metavar="DIR", help="state directory (default: chosen by the dev cluster)")
    p.add_argument("--demo", action="store_true", help="also run a short demo workload")
    p.add_argument(
        "--auth",
        action="store_true",
        help="mutual TLS on every hop and token auth; writes DATA_DIR/ca.pem and DATA_DIR/admin.token",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # Usage errors (2), --help and --version (0): argparse has printed the message already.
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.local is not None:
        return _report(lambda: int(args.local(args)), None)
    with client_log_to_stderr():
        try:
            config = resolve(args, os.environ)
        except ValueError as e:
            parser.print_usage(sys.stderr)
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        handler: commands.Handler = args.handler
        return _report(lambda: handler(config, args), config)


def _report(command: Callable[[], int], config: CliConfig | None) -> int:
    """Run the command; errors become one `gpuctl: error:` line and their exit code."""
    try:
        return command()
    except Unauthenticated as e:
        _error(f"not authenticated: {e.message}", config)
        return EXIT_UNAUTHENTICATED
    except PermissionDenied as e:
        _error(f"permission denied: {e.message}", config)
        return EXIT_PERMISSION_DENIED
    except GpuLeaseError as e:
        _error(e.message, config)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Reader went away (gpuctl allocs | head): silence the flush at exit, too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


def _error(message: str, config: CliConfig | None) -> None:
    # A secret never reaches the terminal, whatever a message might quote.
    if config is not None:
        message = config.redact(message)
    print(f"{PROG}: error: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
