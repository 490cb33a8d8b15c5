"""The container policy's rules (gpulease/common/container_policy.py) as a table, its settings on
both tiers, and the agent's host checks (agent/host_mounts.py) on a temporary directory tree.

What each tier does with a refusal (no Docker call, no container) is tested against the real
dockerd in tests/e2e/test_container_policy.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulease.agent.config import load_config as load_agent_config
from gpulease.agent.host_mounts import check_bind_source
from gpulease.common.container_policy import (
    ContainerPolicy,
    ImageName,
    parse_image,
    tenant_of_volume,
    tenant_volume_name,
    volume_backing_problem,
)
from gpulease.common.settings import ConfigError
from gpulease.coordinator.config import load as load_coordinator_config
from gpulease.errors import GpuLeaseError, InvalidRequest, PermissionDenied
from gpulease.v1 import types_pb2 as tpb

POLICY = ContainerPolicy(
    bind_allowlist=("/data", "/scratch/shared"),
    volume_allowlist=("datasets",),
    registry_allowlist=("docker.io", "ghcr.io/acme", "registry.internal:5000"),
)
TENANT = "ml"


def spec(**kw: Any) -> tpb.ContainerSpec:
    kw.setdefault("image", "busybox:1.36")
    return tpb.ContainerSpec(**kw)


def mount(source: str, target: str = "/mnt", read_only: bool = True) -> dict[str, Any]:
    return {"volumes": [tpb.VolumeMount(source=source, target=target, read_only=read_only)]}


# (what the spec asks, the rule that refuses it, its error class)
REFUSED: list[tuple[str, dict[str, Any], str, type[GpuLeaseError]]] = [
    # bind sources: canonical, never the host's own, only under the allowlist, read-only
    ("root", mount("/"), "bind-forbidden", PermissionDenied),
    ("double slash", mount("//"), "mount-canonical", InvalidRequest),
    ("dot", mount("/./"), "mount-canonical", InvalidRequest),
    ("dot-dot", mount("/data/../etc"), "mount-canonical", InvalidRequest),
    ("a/../b", mount("/a/../b"), "mount-canonical", InvalidRequest),
    ("trailing slash", mount("/data/x/"), "mount-canonical", InvalidRequest),
    ("inner double slash", mount("/data//x"), "mount-canonical", InvalidRequest),
    ("docker socket", mount("/var/run/docker.sock"), "bind-forbidden", PermissionDenied),
    ("docker socket in /run", mount("/run/docker.sock"), "bind-forbidden", PermissionDenied),
    ("docker's data", mount("/var/lib/docker/volumes"), "bind-forbidden", PermissionDenied),
    ("a parent of docker's data", mount("/var/lib"), "bind-forbidden", PermissionDenied),
    ("etc", mount("/etc"), "bind-forbidden", PermissionDenied),
    ("proc", mount("/proc/1/root"), "bind-forbidden", PermissionDenied),
    ("sys", mount("/sys"), "bind-forbidden", PermissionDenied),
    ("dev", mount("/dev/nvidia0"), "bind-forbidden", PermissionDenied),
    ("root's home", mount("/root/.ssh"), "bind-forbidden", PermissionDenied),
    ("boot", mount("/boot"), "bind-forbidden", PermissionDenied),
    ("run", mount("/run/containerd"), "bind-forbidden", PermissionDenied),
    ("not allowlisted", mount("/home/alice"), "bind-allowlist", PermissionDenied),
    ("a sibling of an allowlisted dir", mount("/database"), "bind-allowlist", PermissionDenied),
    ("the allowlist's parent", mount("/scratch"), "bind-allowlist", PermissionDenied),
    ("writable bind", mount("/data/in", read_only=False), "bind-read-only", PermissionDenied),
    # named volumes
    ("volume not allowlisted", mount("postgres-data"), "volume-allowlist", PermissionDenied),
    ("another tenant's volume", mount("t-other-scratch"), "volume-tenant", PermissionDenied),
    ("a longer tenant's volume", mount("t-ml-team-scratch"), "volume-tenant", PermissionDenied),
    ("writable shared volume", mount("datasets", read_only=False), "volume-read-only", PermissionDenied),
    # targets
    ("target under nvidia-container-devices", mount("/data", "/var/run/nvidia-container-devices/GPU-1"),
     "mount-target", PermissionDenied),
    ("target is nvidia-container-devices", mount("/data", "/run/nvidia-container-devices"), "mount-target",
     PermissionDenied),
    ("target not canonical", mount("/data", "/run/../var/run/nvidia-container-devices/0"), "mount-canonical",
     InvalidRequest),
    # env
    ("NVIDIA_DRIVER_CAPABILITIES", {"env": {"NVIDIA_DRIVER_CAPABILITIES": "all"}}, "env-reserved", InvalidRequest),
    ("NVIDIA_VISIBLE_DEVICES", {"env": {"NVIDIA_VISIBLE_DEVICES": "all"}}, "env-reserved", InvalidRequest),
    ("NVIDIA_REQUIRE_CUDA", {"env": {"NVIDIA_REQUIRE_CUDA": "cuda>=1"}}, "env-reserved", InvalidRequest),
    ("nvidia_ in lower case", {"env": {"nvidia_mig_config_devices": "all"}}, "env-reserved", InvalidRequest),
    ("CUDA_VISIBLE_DEVICES", {"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "env-reserved", InvalidRequest),
    # names
    ("hex-like name", {"name": "0123456789ab"}, "container-name", InvalidRequest),
    ("a full id as name", {"name": "f" * 64}, "container-name", InvalidRequest),
    ("gpulease- name", {"name": "gpulease-0123-abc"}, "container-name", InvalidRequest),
    # images
    ("registry not listed", {"image": "quay.io/acme/train:1"}, "image-registry", PermissionDenied),
    ("path not listed", {"image": "ghcr.io/evil/train:1"}, "image-registry", PermissionDenied),
    ("a prefix that is not a path", {"image": "ghcr.io/acme-evil/train:1"}, "image-registry", PermissionDenied),
    ("port differs", {"image": "registry.internal:5001/train:1"}, "image-registry", PermissionDenied),
    ("localhost", {"image": "localhost/train:1"}, "image-registry", PermissionDenied),
    ("by id", {"image": "sha256:" + "a" * 64}, "image-registry", PermissionDenied),
    ("by short id", {"image": "0123456789ab"}, "image-registry", PermissionDenied),
]  # fmt: skip


@pytest.mark.parametrize(("asks", "rule", "error"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_the_rule_named(asks: dict[str, Any], rule: str, error: type[GpuLeaseError]) -> None:
    with pytest.raises(GpuLeaseError) as e:
        POLICY.check(spec(**asks), tenant=TENANT)
    assert type(e.value) is error
    assert e.value.message.startswith(f"rule {rule!r}: "), e.value.message


ALLOWED: list[tuple[str, dict[str, Any]]] = [
    ("nothing special", {}),
    ("an allowlisted directory", mount("/data")),
    ("below one", mount("/data/imagenet/train")),
    ("a file below one", mount("/scratch/shared/config.yaml")),
    ("own tenant volume, writable", mount("t-ml-scratch", read_only=False)),
    ("shared volume, read-only", mount("datasets")),
    ("target /run elsewhere", mount("/data", "/run/data")),
    ("other env", {"env": {"NV_THING": "1", "CUDA_HOME": "/usr/local/cuda", "XNVIDIA_X": "1"}}),
    ("a plain name", {"name": "train-1"}),
    ("a hex name of 11", {"name": "0123456789a"}),
    ("a hex name with a capital", {"name": "0123456789aB"}),
    ("hub, one component", {"image": "busybox"}),
    ("hub, qualified", {"image": "docker.io/library/busybox:1.36"}),
    ("hub alias", {"image": "index.docker.io/acme/train@sha256:" + "b" * 64}),
    ("the test image", {"image": "gpulease-test/busybox:latest"}),
    ("a listed path", {"image": "ghcr.io/acme/train:1"}),
    ("below a listed path", {"image": "ghcr.io/acme/team/train:1"}),
    ("a listed port", {"image": "registry.internal:5000/train"}),
]


@pytest.mark.parametrize("asks", [r[1] for r in ALLOWED], ids=[r[0] for r in ALLOWED])
def test_allowed(asks: dict[str, Any]) -> None:
    POLICY.check(spec(**asks), tenant=TENANT)


def test_tenant_volumes_before_the_tenant_is_known() -> None:
    # The agent's first check, before it fences: the form only; its second check knows the tenant.
    POLICY.check(spec(**mount("t-other-scratch", read_only=False)), tenant=None)
    with pytest.raises(PermissionDenied, match=r"rule .volume-tenant.*this allocation has no tenant"):
        POLICY.check(spec(**mount("t-other-scratch")), tenant="")


def test_the_default_policy_mounts_nothing_and_pulls_from_docker_hub_only() -> None:
    default = ContainerPolicy()
    assert (default.bind_allowlist, default.volume_allowlist, default.registry_allowlist) == ((), (), ("docker.io",))
    with pytest.raises(PermissionDenied, match="none: bind mounts are off"):
        default.check(spec(**mount("/data")))
    default.check(spec(image="busybox"))
    with pytest.raises(PermissionDenied, match="rule 'image-registry'"):
        default.check(spec(image="ghcr.io/acme/train:1"))
    nothing = ContainerPolicy(registry_allowlist=())
    with pytest.raises(PermissionDenied, match="empty: no image may be pulled or run"):
        nothing.check(spec(image="busybox"))


def test_the_agent_s_own_socket_is_never_mounted() -> None:
    policy = ContainerPolicy(bind_allowlist=("/srv",), also_forbidden=("/srv/docker/docker.sock",))
    policy.check(spec(**mount("/srv/data")))
    for source in ("/srv/docker/docker.sock", "/srv/docker"):
        with pytest.raises(PermissionDenied, match="rule 'bind-forbidden'"):
            policy.check(spec(**mount(source)))


def test_parse_image() -> None:
    assert parse_image("busybox") == ImageName("docker.io", "library/busybox")
    assert parse_image("acme/train:1") == ImageName("docker.io", "acme/train")
    assert parse_image("registry-1.docker.io/acme/train") == ImageName("docker.io", "acme/train")
    assert parse_image("GHCR.io/acme/train@sha256:" + "c" * 64) == ImageName("ghcr.io", "acme/train")
    assert parse_image("localhost:5000/a/b:latest") == ImageName("localhost:5000", "a/b")
    for bad in ("", " busybox", "Acme/Train", "a//b", "sha256:abc"):
        with pytest.raises(ValueError):
            parse_image(bad)


def test_tenant_volume_names_say_their_tenant_without_doubt() -> None:
    assert tenant_of_volume("t-ml-scratch") == "ml"
    assert tenant_of_volume("t-ml-team-scratch") == "ml-team"
    assert tenant_of_volume("t-ml.eu-x_1.2") == "ml.eu"
    assert tenant_of_volume("datasets") is None and tenant_of_volume("t-ml") is None
    assert tenant_volume_name("ml-team", "scratch") == "t-ml-team-scratch"
    with pytest.raises(ValueError):
        tenant_volume_name("ml", "team-scratch")  # would read as tenant ml-team's


@pytest.mark.parametrize(
    ("driver", "options", "refused"),
    [
        ("local", {}, False),
        ("local", {"type": "tmpfs", "o": "size=100m"}, False),
        ("nfs-plugin", {}, True),
        ("local", {"type": "none", "o": "bind", "device": "/etc"}, True),
        ("local", {"o": "rbind,ro"}, True),
        ("local", {"device": "/dev/sdb1", "type": "ext4"}, True),
    ],
)
def test_volume_backing(driver: str, options: dict[str, str], refused: bool) -> None:
    assert (volume_backing_problem("v", driver, options) is not None) == refused


# --- settings ----------------------------------------------------------------------------------


def test_coordinator_settings(tmp_path: Path) -> None:
    cfg = load_coordinator_config([], env={})
    assert cfg.container_policy == ContainerPolicy()
    cfg = load_coordinator_config(
        ["--bind-allowlist", "/data, /scratch"],
        env={"GPULEASE_COORDINATOR_REGISTRY_ALLOWLIST": "ghcr.io/acme,docker.io"},
    )
    assert cfg.bind_allowlist == ("/data", "/scratch")
    assert cfg.registry_allowlist == ("ghcr.io/acme", "docker.io")
    toml = tmp_path / "c.toml"
    toml.write_text('volume_allowlist = ["datasets", "models"]\nregistry_allowlist = []\n')
    cfg = load_coordinator_config(["--config", str(toml)], env={})
    assert cfg.volume_allowlist == ("datasets", "models") and cfg.registry_allowlist == ()
    for flag, value, message in (
        ("--bind-allowlist", "/", "never mounted"),
        ("--bind-allowlist", "/var", "/var/run"),
        ("--bind-allowlist", "/data/", "ends with '/'"),
        ("--bind-allowlist", "data", "not an absolute path"),
        ("--volume-allowlist", "t-ml-scratch", "tenant's volume"),
        ("--registry-allowlist", "https://ghcr.io", "not REGISTRY"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_coordinator_config([flag, value], env={})


def test_agent_settings(tmp_path: Path) -> None:
    base = ["--coordinator", "c:1", "--node-id", "n"]
    cfg = load_agent_config(base, {})
    assert cfg.container_policy == ContainerPolicy()
    cfg = load_agent_config(
        [*base, "--docker-host", "unix:///srv//docker.sock", "--registry-allowlist", "registry.internal:5000"],
        {"GPULEASE_AGENT_BIND_ALLOWLIST": "/data"},
    )
    policy = cfg.container_policy
    assert policy.bind_allowlist == ("/data",) and policy.registry_allowlist == ("registry.internal:5000",)
    assert policy.also_forbidden == ("/srv/docker.sock",)
    toml = tmp_path / "a.toml"
    toml.write_text('bind-allowlist = ["/data", "/scratch"]\nvolume_allowlist = "datasets"\n')
    cfg = load_agent_config([*base, "--config", str(toml)], {})
    assert (cfg.bind_allowlist, cfg.volume_allowlist) == (("/data", "/scratch"), ("datasets",))
    with pytest.raises(ConfigError, match=r"bind_allowlist: .*never mounted"):
        load_agent_config([*base, "--bind-allowlist", "/etc/ssl"], {})


# --- the host's part (agent/host_mounts.py) -----------------------------------------------------


def test_bind_sources_are_walked_without_following_symlinks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "real").mkdir(parents=True)
    (data / "real" / "file").write_text("x")
    (data / "link").symlink_to("/etc")
    (data / "dirlink").symlink_to(data / "real")
    check_bind_source("volumes[0]", str(data / "real"))
    check_bind_source("volumes[0]", str(data / "real" / "file"))
    for source, where in (
        (data / "link", data / "link"),
        (data / "link" / "passwd", data / "link"),
        (data / "dirlink" / "file", data / "dirlink"),
    ):
        with pytest.raises(PermissionDenied) as e:
            check_bind_source("volumes[0]", str(source))
        assert e.value.message.startswith("rule 'bind-symlink'") and f"{where} is a symlink" in e.value.message
    with pytest.raises(InvalidRequest, match=r"rule .bind-source.*is missing"):
        check_bind_source("volumes[0]", str(data / "nope"))
    with pytest.raises(InvalidRequest, match="rule 'bind-source'"):
        check_bind_source("volumes[0]", str(data / "real" / "file" / "below"))


def test_bind_sources_must_be_directories_or_regular_files(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(PermissionDenied, match="rule 'bind-file-type'"):
            check_bind_source("volumes[0]", str(path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PermissionDenied, match="rule 'bind-file-type'"):
        check_bind_source("volumes[0]", str(fifo))


_TEXT = st.text(alphabet=st.sampled_from("/.-_:@atT0f9NVIDA\x00 "), max_size=24)


@settings(max_examples=300, deadline=None)
@given(
    image=_TEXT,
    name=_TEXT,
    env=st.dictionaries(_TEXT, _TEXT, max_size=3),
    mounts=st.lists(st.tuples(_TEXT, _TEXT, st.booleans()), max_size=3),
    tenant=st.one_of(st.none(), _TEXT),
)
def test_any_spec_is_allowed_or_refused_with_a_rule(
    image: str, name: str, env: dict[str, str], mounts: list[tuple[str, str, bool]], tenant: str | None
) -> None:
    """Whatever a caller sends, the policy answers with a refusal naming a rule, or not at all:
    never another exception (the coordinator would answer INTERNAL)."""
    volumes = [tpb.VolumeMount(source=s, target=t, read_only=ro) for s, t, ro in mounts]
    try:
        POLICY.check(tpb.ContainerSpec(image=image, name=name, env=env, volumes=volumes), tenant=tenant)
    except (InvalidRequest, PermissionDenied) as e:
        assert e.message.startswith("rule '")
