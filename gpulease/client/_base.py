"""What Client and AsyncClient share: their configuration, the channels they send through, and
their methods, one per coordinator call, declared here once (see ``_calls``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from gpulease.client import _ops
from gpulease.client._calls import Call, Stream
from gpulease.client._failover import Rotation
from gpulease.client._security import ChannelSecurity
from gpulease.client.config import DEFAULT_TARGET, ClientConfig
from gpulease.client.models import AllocationInfo
from gpulease.client.retry import DEFAULT_TIMEOUT_S

C = TypeVar("C", bound=Rotation)


def channel_security(config: ClientConfig) -> ChannelSecurity:
    """The TLS credentials and token metadata of ``config``'s channels (reads the TLS files now)."""
    return ChannelSecurity(config.tls, config.token)


class ClientBase(Generic[C]):
    # The channels a client sends through (sync or asyncio), made from its configuration.
    _channels_class: type[C]

    def __init__(
        self,
        targets: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry_deadline: float | None = None,
        config: ClientConfig | None = None,
    ) -> None:
        """`config` (a ClientConfig) replaces targets, timeout and retry_deadline when given; TLS and a
        token come with it (see gpulease.client.config)."""
        self.config = config or ClientConfig.of(targets, timeout=timeout, retry_deadline=retry_deadline)
        self._rpc = self._channels_class(
            self.config.targets, self.config.timeout, self.config.retry.deadline, channel_security(self.config)
        )

    @property
    def targets(self) -> tuple[str, ...]:
        return self._rpc.targets

    @property
    def timeout(self) -> float:
        return self._rpc.timeout

    @property
    def retry_deadline(self) -> float:
        return self._rpc.retry_deadline

    # The calls. Each subclass says how it sends one (``_send``, ``_send_stream``) and what handle
    # it makes of an allocation record (``_handle``).

    allocate = Call(_ops.allocate)
    release = Call(_ops.release)
    cancel_request = Call(_ops.cancel_request)
    keep_alive = Call(_ops.keep_alive)
    get_allocation = Call(_ops.get_allocation)
    list_allocations = Call(_ops.list_allocations)
    list_nodes = Call(_ops.list_nodes)
    list_pending = Call(_ops.list_pending)
    cluster_summary = Call(_ops.cluster_summary)
    cordon = Call(_ops.cordon)
    delete_node = Call(_ops.delete_node)
    # Quotas and priority classes (setting and deleting: admins).
    list_quotas = Call(_ops.list_quotas)
    set_quota = Call(_ops.set_quota)
    delete_quota = Call(_ops.delete_quota)
    list_priority_classes = Call(_ops.list_priority_classes)
    set_priority_class = Call(_ops.set_priority_class)
    delete_priority_class = Call(_ops.delete_priority_class)
    # Calendar reservations (creating and deleting: admins).
    list_reservations = Call(_ops.list_reservations)
    create_reservation = Call(_ops.create_reservation)
    delete_reservation = Call(_ops.delete_reservation)
    # Who is asking; tokens and the audit log (admins).
    whoami = Call(_ops.whoami)
    create_token = Call(_ops.create_token)
    list_tokens = Call(_ops.list_tokens)
    revoke_token = Call(_ops.revoke_token)
    read_audit = Call(_ops.read_audit)
    # Containers on an allocation's GPUs (the coordinator forwards to the node's agent).
    run_container = Call(_ops.run_container)
    wait_container = Call(_ops.wait_container)
    stop_container = Call(_ops.stop_container)
    list_containers = Call(_ops.list_containers)
    logs = Stream(_ops.logs)
    events = Stream(_ops.events)

    def _send(self, op: _ops.Op[Any, Any]) -> Any:
        """Send ``op``: its answer (as ``_answer`` makes it), or a coroutine of it."""
        raise NotImplementedError

    def _send_stream(self, make: Callable[[], _ops.StreamOp[Any, Any]]) -> Any:
        """Send the stream ``make`` builds, once its first item is asked for: an iterator of the
        items, or an async iterator."""
        raise NotImplementedError

    def _handle(self, info: AllocationInfo) -> Any:
        """A handle on the allocation ``info`` bound to this client."""
        raise NotImplementedError

    def _answer(self, op: _ops.Op[Any, Any], answer: Any) -> Any:
        """The answer to ``op`` as the caller gets it: allocation records as handles on this client."""
        if not op.handles:
            return answer
        if isinstance(answer, list):
            return [self._handle(info) for info in answer]
        return self._handle(answer)
