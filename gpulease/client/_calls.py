"""The coordinator calls as methods, declared once for the sync and the asyncio side.

``ClientBase`` lists the calls (``release = Call(_ops.release)``) and ``_ops`` holds each one's
parameters, defaults and documentation, so Client and AsyncClient have the same methods by
construction. Got from a Client, a method returns the answer; from an AsyncClient, a coroutine:
the clients differ only in how they send an Op (``_send``: blocking, or awaited). The same goes
for ``run_container`` on Allocation and AsyncAllocation (``ContainerStart``; ``_start``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from gpulease.client._ops import Op, StreamOp
from gpulease.client.models import AllocationInfo, Container

if TYPE_CHECKING:
    from gpulease.client._allocation import Allocation, ContainerHandle
    from gpulease.client._sync import Client
    from gpulease.client.aio import AsyncAllocation, AsyncClient, AsyncContainerHandle

P = ParamSpec("P")
R = TypeVar("R")


class _Method:
    """A method whose function sends what ``build`` makes: named, documented and signed like
    ``build`` (less its first ``drop`` parameters, which the method fills in from ``self``)."""

    def __init__(self, build: Callable[..., object], function: Callable[..., Any], drop: int = 0) -> None:
        signature = inspect.signature(build)
        function.__name__ = function.__qualname__ = build.__name__
        function.__doc__ = build.__doc__
        function.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[
                inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
                *list(signature.parameters.values())[drop:],
            ],
            return_annotation=inspect.Signature.empty,
        )
        self._function = function

    def _bind(self, obj: object, owner: type | None) -> Any:
        return self._function.__get__(obj, owner)


class Call(_Method, Generic[P, R]):
    """A unary call as a client method. An allocation record in the answer comes back as a handle
    bound to the client (Allocation, or AsyncAllocation)."""

    def __init__(self, build: Callable[P, Op[Any, R]]) -> None:
        def send(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return client._send(build(*args, **kwargs))

        super().__init__(build, send)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Callable[..., Any]: ...
    @overload
    def __get__(
        self: Call[P, AllocationInfo], client: Client, owner: type | None = None
    ) -> Callable[P, Allocation]: ...
    @overload
    def __get__(
        self: Call[P, list[AllocationInfo]], client: Client, owner: type | None = None
    ) -> Callable[P, list[Allocation]]: ...
    @overload
    def __get__(self, client: Client, owner: type | None = None) -> Callable[P, R]: ...
    @overload
    def __get__(
        self: Call[P, AllocationInfo], client: AsyncClient, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, AsyncAllocation]]: ...
    @overload
    def __get__(
        self: Call[P, list[AllocationInfo]], client: AsyncClient, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, list[AsyncAllocation]]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type | None = None) -> Callable[P, Coroutine[Any, Any, R]]: ...
    def __get__(self, client: object, owner: type | None = None) -> Any:
        return self._bind(client, owner)


class Stream(_Method, Generic[P, R]):
    """A server-streaming call as a client method: an iterator (Client) or an async iterator
    (AsyncClient) of the items. Nothing is sent before the first item is asked for."""

    def __init__(self, build: Callable[P, StreamOp[Any, R]]) -> None:
        def send(client: Any, /, *args: Any, **kwargs: Any) -> Any:
            return client._send_stream(lambda: build(*args, **kwargs))

        super().__init__(build, send)

    @overload
    def __get__(self, client: None, owner: type | None = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Client, owner: type | None = None) -> Callable[P, Iterator[R]]: ...
    @overload
    def __get__(self, client: AsyncClient, owner: type | None = None) -> Callable[P, AsyncIterator[R]]: ...
    def __get__(self, client: object, owner: type | None = None) -> Any:
        return self._bind(client, owner)


class ContainerStart(_Method, Generic[P]):
    """RunContainer as a method of an allocation handle (which fills in the allocation id):
    returns a ContainerHandle, or a coroutine of an AsyncContainerHandle."""

    def __init__(self, build: Callable[Concatenate[str, P], Op[Any, Container]]) -> None:
        def send(handle: Any, /, *args: Any, **kwargs: Any) -> Any:
            return handle._start(lambda: build(handle.id, *args, **kwargs))

        super().__init__(build, send, drop=1)

    @overload
    def __get__(self, handle: None, owner: type | None = None) -> Callable[..., Any]: ...
    @overload
    def __get__(self, handle: Allocation, owner: type | None = None) -> Callable[P, ContainerHandle]: ...
    @overload
    def __get__(
        self, handle: AsyncAllocation, owner: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, AsyncContainerHandle]]: ...
    def __get__(self, handle: object, owner: type | None = None) -> Any:
        return self._bind(handle, owner)
