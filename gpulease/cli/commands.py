"""One handler per gpuctl command: call the client, print the result, return the exit code."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from gpulease.cli import views
from gpulease.cli.config import CliConfig
from gpulease.cli.devconfig import DevClusterConfig
from gpulease.cli.output import print_json, print_table
from gpulease.client.models import ClusterSummary, PendingInfo
from gpulease.common.units import parse_duration, parse_size
from gpulease.errors import InvalidRequest

Handler = Callable[[CliConfig, argparse.Namespace], int]

# The tenant name of the default quota (of tenants without their own).
DEFAULT_QUOTA = "*"


def status(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        summary = client.cluster_summary()
    if args.json:
        nodes = [{"name": n.name, "state": n.state, **views.summary_counters(n)} for n in summary.nodes]
        print_json({"nodes": nodes, "totals": views.summary_counters(summary.totals)})
        return 0
    print_status(summary)
    return 0


def print_status(summary: ClusterSummary) -> None:
    """`gpuctl status`'s table: one row per node and a TOTAL row (gpuctl dev's demo prints it too)."""
    rows = [views.summary_row(n.name, n.state, n) for n in summary.nodes]
    rows.append(views.summary_row("TOTAL", "", summary.totals))
    print_table(["NODE", "STATE", "GPUS", "CPUS", "MEMORY"], rows)


def nodes(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        found = client.list_nodes()
    if args.json:
        print_json([views.node_json(n) for n in found])
    elif not found:
        print("no nodes registered")
    else:
        headers = ["NODE", "STATE", "ADDRESS", "GPUS", "CPUS", "MEMORY", "LABELS"]
        print_table(headers, [views.node_row(n) for n in found])
        foreign = [line for n in found for line in views.foreign_lines(n)]
        if foreign:
            print("\nGPUs used by processes gpulease did not start (not handed out until they stop):")
            for line in foreign:
                print(f"  {line}")
    return 0


def allocs(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        found = client.list_allocations(node=args.node, owner=args.owner)
    if args.json:
        print_json([views.allocation_json(a) for a in found])
    elif not found:
        print("no live allocations")
    else:
        headers = ["ID", "NODE", "GPUS", "CPUS", "MEMORY", "TTL", "OWNER", "REVISION"]
        print_table(headers, [views.allocation_row(a) for a in found])
    return 0


def _flag_value(flag: str, text: str | None, parse: Callable[[str], int]) -> int | None:
    # Parsed here rather than by argparse so that a bad value is an InvalidRequest, reported
    # exactly like the coordinator's own validation errors.
    if text is None:
        return None
    try:
        return parse(text)
    except InvalidRequest as e:
        raise InvalidRequest(f"{flag}: {e.message}") from None


def allocate(cfg: CliConfig, args: argparse.Namespace) -> int:
    memory = _flag_value("--memory", args.memory, parse_size)
    min_gpu_memory = _flag_value("--min-gpu-memory", args.min_gpu_memory, parse_size)
    ttl = _flag_value("--ttl", args.ttl, parse_duration)
    wait = _flag_value("--wait", args.wait, parse_duration)
    max_runtime = _flag_value("--max-runtime", args.max_runtime, parse_duration)

    def pending(status: PendingInfo) -> None:
        # On stderr: stdout stays the answer (one line, or the JSON).
        print(f"pending (position {status.position or '?'}): {status.reason}", file=sys.stderr, flush=True)

    # Only what was given: the rest keeps the library's defaults.
    queueing: dict[str, Any] = {}
    if wait is not None:
        queueing.update(wait=wait, on_pending=pending)
    if max_runtime is not None:
        queueing["max_runtime"] = max_runtime
    if args.priority:
        queueing["priority"] = args.priority
    queueing.update(tenant_options(args))
    if args.nodes:
        queueing["nodes"] = args.nodes
    if args.same:
        queueing["same"] = args.same
    with cfg.client() as client:
        alloc = client.allocate(
            gpus=args.gpus,
            cpus=args.cpus,
            memory=memory,
            gpu_model=args.gpu_model,
            min_gpu_memory=min_gpu_memory,
            node_selector=dict(args.selector),
            ttl=ttl,
            owner=args.owner,
            request_id=args.request_id,
            **queueing,
        )
    if args.json:
        print_json(views.allocation_json(alloc))
        return 0
    print(views.allocation_line(alloc))
    for line in views.member_lines(alloc):
        print(line)
    if args.tenant or args.preemptible or args.priority:
        print(views.allocation_policy_line(alloc))
    print(
        f"note: the lease expires after {alloc.ttl_seconds}s unless kept alive (Client.keep_alive) "
        f"or released (gpuctl release {alloc.id})"
    )
    return 0


def tenant_options(args: argparse.Namespace) -> dict[str, Any]:
    """--tenant and --preemptible as Client.allocate arguments, only those given."""
    out: dict[str, Any] = {}
    if args.tenant:
        out["tenant"] = args.tenant
    if args.preemptible:
        out["preemptible"] = True
    return out


def queue(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        found = client.list_pending()
    if args.json:
        print_json([p.to_dict() for p in found])
    elif not found:
        print("no pending requests")
    else:
        headers = ["POOL", "POS", "ID", "REQUEST", "TENANT", "PRIORITY", "GPUS", "AGE", "REASON"]
        now_ms = time.time() * 1000
        rows = [
            [p.pool or "any", str(p.position), p.id, p.request_id, p.tenant, f"{p.priority_class} ({p.priority})",
             str(p.gpus), f"{max(0, int((now_ms - p.queued_unix_ms) / 1000))}s", p.reason]
            for p in found
        ]  # fmt: skip
        print_table(headers, rows)
    return 0


def release(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        released = client.release(args.id)
    if args.json:
        print_json({"id": args.id, "released": released})
    elif released:
        print(f"released {args.id}")
    else:
        print(f"{args.id} was not live (already released or expired); nothing to do")
    return 0


def _set_cordon(cfg: CliConfig, args: argparse.Namespace, cordoned: bool) -> int:
    with cfg.client() as client:
        node = client.cordon(args.node, cordoned=cordoned)
    if args.json:
        print_json(views.node_json(node))
    elif cordoned:
        print(f"cordoned {node.name}: no new allocations will be placed on it")
    else:
        print(f"uncordoned {node.name}: it takes new allocations again")
    return 0


def cordon(cfg: CliConfig, args: argparse.Namespace) -> int:
    return _set_cordon(cfg, args, cordoned=True)


def uncordon(cfg: CliConfig, args: argparse.Namespace) -> int:
    return _set_cordon(cfg, args, cordoned=False)


def node_delete(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        revision = client.delete_node(args.node)
    if args.json:
        print_json({"node": args.node, "deleted": True, "revision": revision})
    else:
        print(f"deleted node {args.node} (revision {revision})")
    return 0


def whoami(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        me = client.whoami()
    if args.json:
        print_json(views.whoami_json(me))
    else:
        for key, value in views.whoami_json(me).items():
            print(f"{key + ':':<11}{value or '-'}")
    return 0


def token_create(cfg: CliConfig, args: argparse.Namespace) -> int:
    ttl = _flag_value("--expires", args.expires, parse_duration) or 0
    with cfg.client() as client:
        secret, info = client.create_token(args.name, args.role, tenant=args.tenant, ttl_seconds=ttl)
    # The secret alone on stdout (`gpuctl token create ci --role user > ci.token`); it is not stored
    # anywhere, so this is the only time it is shown. What it is goes to stderr.
    print(secret, flush=True)
    expires = f"expires {views.when(info.expires_unix_ms)}" if info.expires_unix_ms else "never expires"
    print(
        f"gpuctl: created token {info.name} (role {info.role}, tenant {info.tenant}, {expires}); "
        "the secret above is shown only this once",
        file=sys.stderr,
    )
    return 0


def token_list(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        tokens = client.list_tokens()
    if args.json:
        print_json([views.token_json(t) for t in tokens])
    elif not tokens:
        print("no tokens")
    else:
        print_table(
            ["NAME", "ROLE", "TENANT", "CREATED", "EXPIRES", "CREATED_BY"], [views.token_row(t) for t in tokens]
        )
    return 0


def token_revoke(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        revoked = client.revoke_token(args.name)
    if args.json:
        print_json({"name": args.name, "revoked": revoked})
    elif revoked:
        print(f"revoked token {args.name}: it no longer authenticates anyone")
    else:
        print(f"no token {args.name} was live; nothing to do")
    return 0


def _tenant_arg(args: argparse.Namespace) -> str:
    # TENANT and --default are exclusive, one required (argparse); --default is the tenant "*".
    return DEFAULT_QUOTA if args.default else str(args.tenant)


def quota_list(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        found = client.list_quotas()
    if args.json:
        print_json([q.to_dict() for q in found])
    elif not found:
        print("no quotas, usage or pending requests (tenants are unlimited)")
    else:
        headers = [
            "TENANT",
            "GPUS",
            "MODELS",
            "BORROWED",
            "CPUS",
            "MEMORY",
            "PENDING",
            "GPU-HOURS",
            "LIFETIME",
            "WEIGHT",
        ]
        print_table(headers, [views.quota_row(q) for q in found])
    return 0


def quota_set(cfg: CliConfig, args: argparse.Namespace) -> int:
    tenant = _tenant_arg(args)
    memory = _flag_value("--memory", args.memory, parse_size)
    lifetime = _flag_value("--lifetime", args.lifetime, parse_duration)
    with cfg.client() as client:
        quota = client.set_quota(tenant, gpus=args.gpus, models=dict(args.model), cpus=args.cpus, memory=memory,
                                 borrow=args.borrow, max_lifetime=lifetime, weight=args.weight)  # fmt: skip
    if args.json:
        print_json(quota.to_dict())
    else:
        print(f"set {views.quota_name(tenant)}: {views.quota_summary(quota)}")
    return 0


def quota_delete(cfg: CliConfig, args: argparse.Namespace) -> int:
    tenant = _tenant_arg(args)
    with cfg.client() as client:
        deleted = client.delete_quota(tenant)
    if args.json:
        print_json({"tenant": tenant, "deleted": deleted})
    elif deleted:
        print(f"deleted {views.quota_name(tenant)}")
    else:
        print(f"{views.quota_name(tenant)} was not set; nothing to do")
    return 0


def reservation_list(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        found = client.list_reservations()
    if args.json:
        print_json([r.to_dict() for r in found])
    elif not found:
        print("no reservations")
    else:
        rows = [[r.name, r.tenant, str(r.gpus), ",".join(f"{n}:{k}" for n, k in sorted(r.nodes.items())),
                 r.gpu_model or "any", _utc(r.start_unix_ms), _utc(r.end_unix_ms), "yes" if r.active else "no"]
                for r in found]  # fmt: skip
        print_table(["NAME", "TENANT", "GPUS", "NODES", "MODEL", "START", "END", "ACTIVE"], rows)
    return 0


def reservation_create(cfg: CliConfig, args: argparse.Namespace) -> int:
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    with cfg.client() as client:
        r = client.create_reservation(args.name, args.tenant, args.gpus, end=args.end, start=args.start, nodes=nodes,
                                      gpu_model=args.model)  # fmt: skip
    if args.json:
        print_json(r.to_dict())
    else:
        where = ", ".join(f"{k} on {n}" for n, k in sorted(r.nodes.items()))
        print(f"reserved {r.gpus} GPUs ({where}) for {r.tenant} from {_utc(r.start_unix_ms)} to {_utc(r.end_unix_ms)}")
    return 0


def reservation_delete(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        deleted = client.delete_reservation(args.name)
    if args.json:
        print_json({"name": args.name, "deleted": deleted})
    elif deleted:
        print(f"deleted reservation {args.name}")
    else:
        print(f"no reservation {args.name}; nothing to do")
    return 0


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def priority_list(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        classes = client.list_priority_classes()
    if args.json:
        print_json([c.to_dict() for c in classes])
    elif not classes:
        print("no priority classes")
    else:
        print_table(["NAME", "VALUE", "DEFAULT", "GRACE", "MIN-RUNTIME"], [views.priority_row(c) for c in classes])
    return 0


def priority_set(cfg: CliConfig, args: argparse.Namespace) -> int:
    grace = _flag_value("--grace", args.grace, parse_duration)
    min_runtime = _flag_value("--min-runtime", args.min_runtime, parse_duration)
    with cfg.client() as client:
        klass = client.set_priority_class(args.name, args.value, default=args.default, grace=grace,
                                          min_runtime=min_runtime)  # fmt: skip
    if args.json:
        print_json(klass.to_dict())
    else:
        print(f"set priority class {views.priority_summary(klass)}")
    return 0


def priority_delete(cfg: CliConfig, args: argparse.Namespace) -> int:
    with cfg.client() as client:
        deleted = client.delete_priority_class(args.name)
    if args.json:
        print_json({"name": args.name, "deleted": deleted})
    else:
        print(f"deleted priority class {args.name}")
    return 0


def audit(cfg: CliConfig, args: argparse.Namespace) -> int:
    since = _flag_value("--since", args.since, parse_duration)
    since_ms = int((time.time() - since) * 1000) if since is not None else 0
    with cfg.client() as client:
        entries = client.read_audit(since_unix_ms=since_ms, actor=args.actor, limit=args.limit or 0)
    if args.json:
        print_json([views.audit_json(e) for e in entries])
    elif not entries:
        print("no audit entries")
    else:
        headers = ["TIME", "ACTOR", "TENANT", "ACTION", "TARGET", "OUTCOME", "REVISION", "DETAIL"]
        print_table(headers, [views.audit_row(e) for e in entries])
    return 0


def events(cfg: CliConfig, args: argparse.Namespace) -> int:
    """One line per event (time, type, node, allocation, tenant, detail) or one JSON object per line,
    flushed as each arrives (--follow runs until interrupted)."""
    with cfg.client() as client:
        try:
            for ev in client.events(args.since, follow=args.follow, types=args.types):
                if args.json:
                    print(json.dumps(ev.to_dict(), separators=(",", ":")), flush=True)
                else:
                    print(views.event_line(ev), flush=True)
        except KeyboardInterrupt:
            return 130
    return 0


def top(cfg: CliConfig, args: argparse.Namespace) -> int:
    """A live view of nodes and GPUs (utilization, holder), redrawn in place every --interval until
    Ctrl-C; --once prints one frame and exits."""
    from gpulease.cli import top as top_view

    with cfg.client() as client:
        return top_view.run(lambda: (client.list_nodes(), client.list_allocations()), interval=args.interval,
                            once=args.once, source=", ".join(cfg.targets))  # fmt: skip


def dev(args: argparse.Namespace) -> int:
    config = DevClusterConfig(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        port=args.port,
        data_dir=args.data_dir,
        demo=args.demo,
        auth=args.auth,
        http_port=args.http_port,
    )
    try:
        # Imported here: it needs the coordinator/agent/etcd extras, which gpuctl alone does not.
        from gpulease.dev.ui import run_dev_cluster
    except ImportError as e:
        print(
            f"gpuctl: error: gpuctl dev needs the server extras ({e}); "
            "install them with: pip install 'gpulease[coordinator,agent,etcd]'",
            file=sys.stderr,
        )
        return 1
    return run_dev_cluster(config)
