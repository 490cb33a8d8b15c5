"""etcd key layout. Every key lives under one configurable prefix (default "/gpulease/").

    nodes/<node>              node record (JSON), no lease: survives the node going down
    alive/<node>              "" on the node's lease: present <=> node is up
    cordoned/<node>           "" when an operator cordoned the node (no lease)
    allocs/<id>               allocation record (JSON) on the allocation's lease
    gpus/<node>/<uuid>        allocation id on the allocation's lease: one key per held GPU, by UUID
                              (indexes move when a GPU falls off the bus and the host reboots)
    res/<node>/<id>           {"cpus","memory"} on the allocation's lease: CPU/memory held on a node
    reqs/<request_id>         allocation id on the allocation's lease: idempotency of Allocate
                              ("" on a lease of its own: a settler blocked a commit in doubt;
                              "~released <id>" on a shared tombstone lease: released or cancelled,
                              so no attempt still in flight can commit: coordinator/tombstones.py)
    claimed/<id>              "" on the allocation's lease: a retry was handed this allocation, so
                              no settler may remove it
    unsettled/<id>            {"lease","request_id"}, no lease: an allocation whose commit outcome
                              is unknown and was not settled yet; any replica finishes the job
    marker                    "" rewritten by a coordinator to learn that its view has caught up
    tokens/<name>             bearer token record (JSON): SHA-256 of the secret, role, tenant, expiry
    bootstrapped              "" once the first admin token was made (never made again)
    containers/<id>           {"node","principal","tenant","ended_ms"}: where an allocation's containers
                              are and whose they are; on a retention-time lease once it ended
    expired/<id>              "" on a short lease: the expiry of <id> is in the audit log (once)
    queue/<id>                a pending request (JSON) on its waiting lease, kept alive while its
                              client waits; <id> becomes the allocation's id when admitted
    queued/<sha256(request)>  the pending id of a scoped request id, on the same lease: one pending
                              request per request id, across replicas
    usage/<tenant>/<id>       {"gpus","models","cpus","memory"} on the allocation's lease: what it
                              counts against its tenant's quota (range-compared like res/<node>/)
    quotas/<tenant>           a tenant's quota (JSON, no lease); quotas/* is the default for tenants
                              with none of their own
    priorities/<name>         a priority class (JSON, no lease), on top of the configured ones
    preempting/<id>           {"by","cause","deadline_ms",...} on the victim's lease: the allocation
                              is being preempted (coordinator/preemption.py)
    claims/<pending id>       {"node","gpus","victims"} on the preemptor's waiting lease: GPUs held
                              for it until it is admitted or leaves
    reservations/<name>       {"tenant","start_ms","end_ms","gpus":{node: n},"model",...}: capacity held
                              for one tenant over a window, on a lease that ends shortly after it;
                              the allocation txn range-compares reservations/ (coordinator/reservations.py)
    drain/<node>/<id>         {"gpus": [uuid...]}, no lease: GPUs of <id> that ran containers on <node>,
                              held until the node's agent reports them stopped (coordinator/draining.py)
    fairshare                 {"at_ms", "usage": {tenant: decayed GPU-seconds}}: the fair-share
                              ledger, advanced by whichever replica finds it stale (a CAS)
    audit/<ms>-<rand>         one audit entry (JSON), bounded by age and count

Everything an allocation holds hangs on its lease, so lease expiry frees it with no
coordinator action. The layout is per-resource rather than per-node so that one etcd
transaction can claim GPUs on several nodes (gang allocations) and compare a tenant's usage
range (usage/<tenant>/) the same way res/<node>/ is compared.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gpulease.coordinator.domain import Allocation


@dataclass(frozen=True)
class Keys:
    prefix: str = "/gpulease/"

    def node(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}"

    def alive(self, node: str) -> str:
        return f"{self.prefix}alive/{node}"

    def cordoned(self, node: str) -> str:
        return f"{self.prefix}cordoned/{node}"

    def alloc(self, alloc_id: str) -> str:
        return f"{self.prefix}allocs/{alloc_id}"

    def gpu(self, node: str, uuid: str) -> str:
        # By UUID, the physical GPU (containers get GPUs by UUID too): a claim on an index would
        # follow the index to another GPU after a reboot re-numbers them (issue 11, defect 2).
        return f"{self.prefix}gpus/{node}/{uuid}"

    def gpus_prefix(self, node: str) -> str:
        return f"{self.prefix}gpus/{node}/"

    def res_prefix(self, node: str) -> str:
        return f"{self.prefix}res/{node}/"

    def res(self, node: str, alloc_id: str) -> str:
        return f"{self.res_prefix(node)}{alloc_id}"

    def req(self, request_id: str) -> str:
        return f"{self.prefix}reqs/{request_id}"

    def claimed(self, alloc_id: str) -> str:
        return f"{self.prefix}claimed/{alloc_id}"

    def unsettled(self, alloc_id: str) -> str:
        return f"{self.prefix}unsettled/{alloc_id}"

    def unsettled_prefix(self) -> str:
        return f"{self.prefix}unsettled/"

    def token(self, name: str) -> str:
        return f"{self.prefix}tokens/{name}"

    def bootstrapped(self) -> str:
        return f"{self.prefix}bootstrapped"

    def containers(self, alloc_id: str) -> str:
        return f"{self.prefix}containers/{alloc_id}"

    def expired(self, alloc_id: str) -> str:
        return f"{self.prefix}expired/{alloc_id}"

    def audit(self, entry_id: str) -> str:
        return f"{self.prefix}audit/{entry_id}"

    def audit_prefix(self) -> str:
        return f"{self.prefix}audit/"

    def queue(self, pending_id: str) -> str:
        return f"{self.prefix}queue/{pending_id}"

    def queued(self, request_id: str) -> str:
        # Hashed: a scoped request id holds '/' and other characters that are not one key segment.
        return f"{self.prefix}queued/{hashlib.sha256(request_id.encode()).hexdigest()}"

    def usage(self, tenant: str, alloc_id: str) -> str:
        return f"{self.usage_prefix(tenant)}{alloc_id}"

    def usage_prefix(self, tenant: str) -> str:
        return f"{self.prefix}usage/{tenant}/"

    def quota(self, tenant: str) -> str:
        return f"{self.prefix}quotas/{tenant}"

    def priority_class(self, name: str) -> str:
        return f"{self.prefix}priorities/{name}"

    def preempting(self, alloc_id: str) -> str:
        return f"{self.prefix}preempting/{alloc_id}"

    def claim(self, pending_id: str) -> str:
        return f"{self.prefix}claims/{pending_id}"

    def reservation(self, name: str) -> str:
        return f"{self.prefix}reservations/{name}"

    def reservations_prefix(self) -> str:
        return f"{self.prefix}reservations/"

    def drain(self, node: str, alloc_id: str) -> str:
        return f"{self.prefix}drain/{node}/{alloc_id}"

    def drain_prefix(self, node: str) -> str:
        return f"{self.prefix}drain/{node}/"

    def fairshare(self) -> str:
        return f"{self.prefix}fairshare"

    def of_allocation(self, a: Allocation) -> list[str]:
        """Every key a live allocation holds (what a release deletes), in one place: on every member
        node of a gang."""
        out = [self.alloc(a.id), self.req(a.request_id)]
        for m in a.members:
            out.append(self.res(m.node, a.id))
            out += [self.gpu(m.node, g.uuid) for g in m.gpus]
        if a.tenant:
            out.append(self.usage(a.tenant, a.id))
        return out

    def marker(self) -> str:
        return f"{self.prefix}marker"

    def allocs_prefix(self) -> str:
        return f"{self.prefix}allocs/"

    def parse(self, key: str) -> tuple[str, ...] | None:
        """'/p/gpus/n1/GPU-1f2e' -> ('gpus', 'n1', 'GPU-1f2e'); None for keys outside the prefix."""
        if not key.startswith(self.prefix):
            return None
        return tuple(key[len(self.prefix) :].split("/"))


def range_end(prefix: str) -> bytes:
    """Exclusive end of the key range that starts with prefix (etcd's prefix idiom)."""
    b = bytearray(prefix.encode())
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\x00"
