"""A bounded fuzz run of every coordinator RPC, with and without credentials (issue 13).

Requests are random messages built from each RPC's input descriptor (odd strings, extreme
integers, unknown enum values, nested messages, maps). For every call:
- no INTERNAL and no UNKNOWN: bad input is a clear error, never a crash;
- no bypass: a call without a credential, or with a bad token, is UNAUTHENTICATED whatever it
  carries, and a viewer gets PERMISSION_DENIED for anything but reads;
and the coordinator is still serving at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpulease.coordinator import authz
from gpulease.dev.cluster import LocalCluster
from gpulease.v1 import coordinator_pb2 as pb
from tests.support import harness
from tests.support.secure import Caller, bearer, channel, make_token

pytestmark = pytest.mark.slow

ODD_TEXT = st.sampled_from(["", " ", "../../etc/passwd", "a" * 5000, "\x00", "ü/ñ", "node-1", "%s%n", "gpl_x"])
TEXT = st.one_of(ODD_TEXT, st.text(max_size=40))
INTS = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
}


def value_of(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return TEXT
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 99))
    if field.type in INTS:
        edges = [0, 1] if field.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64) else [0, 1, -1]
        return st.one_of(INTS[field.type], st.sampled_from(edges))
    if field.type == FieldDescriptor.TYPE_DOUBLE or field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    assert field.type == FieldDescriptor.TYPE_MESSAGE
    return message_of(field.message_type, depth + 1)


def message_of(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE and depth >= 2:
            continue
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            fields[f.name] = st.dictionaries(value_of(k, depth), value_of(v, depth), max_size=3)
        elif f.is_repeated:
            fields[f.name] = st.lists(value_of(f, depth), max_size=3)
        else:
            fields[f.name] = value_of(f, depth)
    return st.fixed_dictionaries({}, optional=fields)


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, name)
            for k, v in value.items():
                if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                    target[k].CopyFrom(build(target[k].__class__, v))
                else:
                    target[k] = v
        elif field.is_repeated:
            target = getattr(msg, name)
            for v in value:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    element = target.add()
                    element.CopyFrom(build(type(element), v))
                else:
                    target.append(v)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(build(type(getattr(msg, name)), value))
        else:
            setattr(msg, name, value)
    return msg


RPCS = authz.all_rpcs()
INPUTS = {f"{s.full_name}/{m.name}": m.input_type for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
STREAMING = {
    f"{s.full_name}/{m.name}": m.server_streaming for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
}
INPUT_CLASSES: dict[str, type[Message]] = {}


def input_class(rpc: str) -> type[Message]:
    from google.protobuf import message_factory

    if rpc not in INPUT_CLASSES:
        INPUT_CLASSES[rpc] = message_factory.GetMessageClass(INPUTS[rpc])
    return INPUT_CLASSES[rpc]


@pytest.fixture(scope="module")
def fuzz_cluster(tmp_path_factory: pytest.TempPathFactory, etcd: harness.Etcd) -> Iterator[dict[str, Caller]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    cluster: LocalCluster = harness.new_cluster(etcd, harness.new_prefix(), Path(tmp), secure=True)
    channels = []
    try:
        cluster.add_coordinator()
        ch = channel(cluster, cluster.coordinator_address)
        channels.append(ch)
        stub = harness.AnyService(ch)
        admin = Caller("admin", stub, bearer(cluster.admin_token()))
        callers = {
            "none": Caller("none", stub),
            "bad-token": Caller("bad-token", stub, bearer("gpl_" + "A" * 43)),
            "viewer": Caller("viewer", stub, bearer(make_token(admin, "fuzz-viewer", "viewer"))),
            "user": Caller("user", stub, bearer(make_token(admin, "fuzz-user", "user"))),
            "admin": admin,
        }
        callers["_cluster"] = cluster  # type: ignore[assignment]
        yield callers
        assert cluster.first_dead() is None, "the coordinator died under fuzzing"
        admin.ListNodes(pb.ListNodesRequest())  # still serving
    finally:
        for c in channels:
            c.close()
        cluster.stop()


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.rsplit("/", 1)[1])
def test_fuzz_rpc(fuzz_cluster: dict[str, Caller], rpc: str) -> None:
    cls = input_class(rpc)
    rule = authz.RULES[rpc]
    name = rpc.rsplit("/", 1)[1]

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(values=message_of(cls.DESCRIPTOR), who=st.sampled_from(["none", "bad-token", "viewer", "user", "admin"]))
    def run(values: dict[str, Any], who: str) -> None:
        request = build(cls, values)
        caller = fuzz_cluster[who]
        code = grpc.StatusCode.OK
        try:
            answer = getattr(caller.stub, name)(request, metadata=caller.metadata, timeout=5)
            if STREAMING[rpc]:  # a stream's refusal arrives with its first message
                for _ in answer:
                    break
                answer.cancel()
        except grpc.RpcError as err:
            code = err.code()  # type: ignore[attr-defined]
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (who, request, err)
        if who in ("none", "bad-token"):
            assert code == grpc.StatusCode.UNAUTHENTICATED, (who, request, code)
        elif (
            (who == "viewer" and rule is not authz.Rule.READ)
            or rule is authz.Rule.NODE
            or (rule is authz.Rule.ADMIN and who != "admin")
        ):
            assert code == grpc.StatusCode.PERMISSION_DENIED, (who, request, code)

    run()
