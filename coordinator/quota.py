"""Tenant quotas: the one rule of whether a tenant may take more, as a pure function.

A quota (etcd ``quotas/<tenant>``; ``quotas/*`` is the default for tenants with none of their own,
and there is no default unless an admin sets one) limits what a tenant's live allocations hold:

    gpus      nominal GPUs overall; the tenant may hold up to gpus + borrow
    models    nominal GPUs per model (exact model name); up to models[m] + borrow of model m
    cpus      a hard cap on reserved CPUs (no borrowing)
    memory    a hard cap on reserved memory (no borrowing)
    borrow    GPUs above nominal, out of capacity other tenants leave unused. Borrowed GPUs are
              what a tenant holds above its nominal quota; a tenant below its own nominal quota may
              reclaim them by preemption (coordinator/preemption_plan.py)
    lifetime  an allocation's lease is not renewed past this age (KeepAlive says why)
    weight    the fair-share weight (0: the nominal GPUs, or 1 without them)

Usage is what the tenant's live allocations hold, from the ``usage/<tenant>/<id>`` keys each
allocation writes on its own lease (so expiry frees quota with no coordinator action). The check
here runs on a snapshot; the allocation transaction then compares that no usage key of the tenant
was written since that snapshot (a range compare, like ``res/<node>/``) and that the quota records
are as the snapshot saw them. Two replicas admitting for one tenant at once cannot both pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DEFAULT_TENANT_KEY = "*"


@dataclass(frozen=True)
class Quota:
    gpus: int | None = None
    models: Mapping[str, int] = field(default_factory=dict)
    cpus: int | None = None
    memory_bytes: int | None = None
    borrow: int = 0
    max_lifetime_s: int = 0
    weight: float = 0.0

    @property
    def limits_usage(self) -> bool:
        """Whether any part of it caps what a tenant holds (a lifetime or weight alone does not)."""
        return self.gpus is not None or bool(self.models) or self.cpus is not None or self.memory_bytes is not None

    @property
    def share_weight(self) -> float:
        if self.weight > 0:
            return self.weight
        return float(self.gpus) if self.gpus else 1.0


@dataclass(frozen=True)
class Usage:
    gpus: int = 0
    models: Mapping[str, int] = field(default_factory=dict)
    cpus: int = 0
    memory_bytes: int = 0

    def plus(self, other: Usage, sign: int = 1) -> Usage:
        models = dict(self.models)
        for m, n in other.models.items():
            models[m] = models.get(m, 0) + sign * n
        return Usage(
            self.gpus + sign * other.gpus,
            MappingProxyType({m: n for m, n in models.items() if n}),
            self.cpus + sign * other.cpus,
            self.memory_bytes + sign * other.memory_bytes,
        )


NO_USAGE = Usage()


@dataclass(frozen=True)
class QuotaBook:
    """What placement needs to know about tenants at one revision: the quota records as seen (with
    their mod revisions, which the transaction compares) and what each tenant holds."""

    quotas: Mapping[str, tuple[Quota, int]] = field(default_factory=dict)
    usage: Mapping[str, Usage] = field(default_factory=dict)

    def quota_for(self, tenant: str) -> tuple[Quota | None, bool]:
        """(the quota that applies, whether it is the default one)."""
        own = self.quotas.get(tenant)
        if own is not None:
            return own[0], False
        default = self.quotas.get(DEFAULT_TENANT_KEY)
        return (default[0], True) if default is not None else (None, False)

    def revision(self, tenant: str) -> int:
        """mod revision of the tenant's own quota record as seen (0: none)."""
        found = self.quotas.get(tenant)
        return found[1] if found else 0

    def usage_of(self, tenant: str) -> Usage:
        return self.usage.get(tenant, NO_USAGE)

    def weight(self, tenant: str) -> float:
        """The tenant's fair-share weight: its quota's (see Quota.share_weight), 1 without a quota."""
        quota, _ = self.quota_for(tenant)
        return quota.share_weight if quota is not None else 1.0

    def limited(self, tenant: str) -> bool:
        quota, _ = self.quota_for(tenant)
        return quota is not None and quota.limits_usage


EMPTY_BOOK = QuotaBook()


def borrowed(quota: Quota | None, usage: Usage) -> int:
    """GPUs held above the nominal quota (0 without a nominal GPU quota)."""
    if quota is None or quota.gpus is None:
        return 0
    return max(0, usage.gpus - quota.gpus)


def over_quota(tenant: str, quota: Quota | None, usage: Usage, adding: Usage) -> str | None:
    """None when ``usage + adding`` stays within ``quota``; else the reason, naming what is full
    (``quota: team-a uses 8 of 8 A100``). ``adding.models`` may be empty when the model is not
    known yet (a request for any model, before placement): model limits are then checked later."""
    if quota is None or not quota.limits_usage:
        return None
    after = usage.plus(adding)
    if quota.gpus is not None and after.gpus > quota.gpus + quota.borrow:
        return f"quota: {tenant} uses {usage.gpus} of {_gpus(quota.gpus, quota.borrow)} GPUs (asks for {adding.gpus})"
    for model, n in adding.models.items():
        cap = quota.models.get(model)
        if cap is not None and after.models.get(model, 0) > cap + quota.borrow:
            held = usage.models.get(model, 0)
            return f"quota: {tenant} uses {held} of {_gpus(cap, quota.borrow)} {model} (asks for {n})"
    if quota.cpus is not None and after.cpus > quota.cpus:
        return f"quota: {tenant} uses {usage.cpus} of {quota.cpus} CPUs (asks for {adding.cpus})"
    if quota.memory_bytes is not None and after.memory_bytes > quota.memory_bytes:
        return (f"quota: {tenant} uses {_gib(usage.memory_bytes)} of {_gib(quota.memory_bytes)} memory "
                f"(asks for {_gib(adding.memory_bytes)})")  # fmt: skip
    return None


def never_fits(tenant: str, quota: Quota | None, adding: Usage) -> str | None:
    """The reason a request exceeds the quota even with nothing held (it can never be admitted)."""
    return over_quota(tenant, quota, NO_USAGE, adding)


def _gpus(nominal: int, borrow: int) -> str:
    return f"{nominal}" if not borrow else f"{nominal} (+{borrow} borrowable)"


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n % 2**30 else f"{n // 2**30} GiB"


# --- fair share --------------------------------------------------------------------------------


def decayed(value: float, elapsed_s: float, half_life_s: float) -> float:
    """``value`` after ``elapsed_s`` of exponential decay with the given half-life."""
    if half_life_s <= 0 or elapsed_s <= 0:
        return value
    return value * math.exp(-math.log(2) * elapsed_s / half_life_s)


def share_key(tenant: str, book: QuotaBook, fair_usage: Mapping[str, float]) -> float:
    """The fair-share order of a tenant: decayed usage per unit of weight (lower goes first)."""
    return fair_usage.get(tenant, 0.0) / book.weight(tenant)
