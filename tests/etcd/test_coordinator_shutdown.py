"""Issue 12, point 9: a coordinator that stops leaves no loose ends behind its answers."""

from __future__ import annotations

import asyncio

from gpulease.coordinator.store import Store
from tests.support import harness
from tests.support.inproc import core, node_info


class SlowRevokeStore(Store):
    """The real store; every revoke is noted and takes 0.3 s longer, so it is still on its way
    when the coordinator is told to stop."""

    revoked: list[int]

    async def revoke(self, lease_id: int) -> int:
        self.revoked = [*getattr(self, "revoked", []), lease_id]
        await asyncio.sleep(0.3)
        return await super().revoke(lease_id)


async def test_background_revokes_finish_before_the_store_closes(etcd: harness.Etcd, prefix: str) -> None:
    store = SlowRevokeStore([etcd.url])
    async with core([etcd.url], prefix, store=store) as c:
        await c.nodes.register(node_info("n1", gpus=4))
        assert await c.view.wait_for_revision(await c.store.put(f"{prefix}sync", b""), 5)
        first = await c.allocate(gpus=1, request_id="same")
        # The retry takes a lease of its own, finds the request id taken and returns `first`: its own
        # lease is revoked in the background. The coordinator stops right after the answer.
        again = await c.allocate(gpus=1, request_id="same")
        assert again.id == first.id
    direct = Store([etcd.url])
    await direct.start()
    try:
        assert store.revoked, "the retry's lease was never revoked"
        assert [(await direct.keepalive(lease)).ttl for lease in store.revoked] == [0] * len(store.revoked)
        assert (await direct.keepalive(first.lease_id)).ttl > 0  # the allocation itself lives on
    finally:
        await direct.close()
