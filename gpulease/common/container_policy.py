"""What a container may ask of its GPU server (issue 14, part A): mounts, volumes, env, name, image.

Each rule is written once, here, and checked twice: by the coordinator on RunContainer, against
its copy of the policy, before anything is forwarded; and by the agent on StartContainer, against
its own copy, before any Docker call. The agent is the last line: it enforces its own copy even
when the coordinator's differs. The agent adds what only the host can tell (agent/host_mounts.py):
that no component of a bind source is a symlink, that the source is a directory or a regular
file, and what a named volume is backed by (judged here, by ``volume_backing_problem``).

Pure: no docker, no grpc, no I/O. Every refusal names its rule, "rule 'bind-allowlist': ...":

=================== ===================================================================== =======
rule                what it refuses                                                       error
=================== ===================================================================== =======
mount-canonical     a bind source or mount target with '..', '.', '//', a trailing '/',   invalid
                    or not absolute
bind-forbidden      a bind source that is, is under, or contains '/', the Docker socket,  denied
                    /proc, /sys, /dev, /etc, /root, /boot, /run, /var/run, /var/lib/docker
                    (or the agent's own Docker socket), whatever the allowlist says
bind-allowlist      a bind source outside ``bind_allowlist`` (empty by default)           denied
bind-read-only      a writable bind mount: allowlisted directories are shared by every    denied
                    allocation of the server, so they are mounted read-only
volume-allowlist    a named volume neither on ``volume_allowlist`` nor of the tenant form denied
volume-tenant       t-<tenant>-<name> of another tenant (or an allocation without tenant) denied
volume-read-only    a writable allowlisted volume (shared, like bind mounts)              denied
volume-driver       a volume not on the local driver, or whose options name a bind or a   denied
                    device (judged by the agent from Docker's answer)
mount-target        a target at or under /run/nvidia-container-devices or                 denied
                    /var/run/nvidia-container-devices (the toolkit reads GPU requests
                    from mounts there)
env-reserved        any NVIDIA_* variable, and CUDA_VISIBLE_DEVICES: the allocation       invalid
                    decides which GPUs and driver capabilities a container gets
container-name      a name that looks like a container id (^[0-9a-f]{12,64}$) or starts   invalid
                    with 'gpulease-' (the agent's own names)
image-registry      an image whose registry (and path) is not on ``registry_allowlist``   denied
                    (docker.io by default), or an image named by id
=================== ===================================================================== =======

"denied" is PermissionDenied (PERMISSION_DENIED): the request is well formed, but this server's
policy does not allow it. "invalid" is InvalidRequest (INVALID_ARGUMENT): no policy allows it.

Writable space comes from per-tenant named volumes, ``t-<tenant>-<name>``: the agent creates one
(local driver, no options, labelled with its tenant) the first time an allocation of that tenant
mounts it, only that tenant's allocations may mount it, and the agent removes it once no container
uses it and it is older than the container retention (agent/enforcer.py). <name> has no '-', so a
volume name tells its tenant without doubt (t-ml-team-x is tenant ml-team's, never tenant ml's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gpulease.errors import InvalidRequest, PermissionDenied
from gpulease.v1 import types_pb2 as tpb

# Unqualified names ("busybox", "library/busybox") mean Docker Hub: the default allows them, so
# that `gpuctl dev` and the offline test image keep working.
DEFAULT_REGISTRIES = ("docker.io",)
DOCKER_HUB = "docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

# Never a bind source, whatever the allowlist says: a source equal to one of these, under one, or
# containing one (so '/', '/var' and '/var/lib' too).
FORBIDDEN_SOURCES = (
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/root",
    "/boot",
    "/run",
    "/var/run",
    "/var/lib/docker",
    # Docker's default socket; the agent adds the one it is configured with (ContainerPolicy.also_forbidden).
    "/run/docker.sock",
    "/var/run/docker.sock",
)
# Mount targets under these are how NVIDIA's toolkit can be asked for devices
# (accept-nvidia-visible-devices-as-volume-mounts): never the caller's to set.
FORBIDDEN_TARGETS = ("/run/nvidia-container-devices", "/var/run/nvidia-container-devices")

_ID_LIKE_RE = re.compile(r"^[0-9a-f]{12,64}$")
_RESERVED_NAME_PREFIX = "gpulease-"
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
# t-<tenant>-<name>: tenant as identity names go (gpulease.common.identity.NAME_RE), name without '-'.
_TENANT_VOLUME_RE = re.compile(
    r"^t-(?P<tenant>[A-Za-z0-9][A-Za-z0-9._-]{0,62})-(?P<name>[A-Za-z0-9][A-Za-z0-9_.]{0,63})$"
)
_REGISTRY_RE = re.compile(
    r"^(localhost|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)(:[0-9]{1,5})?$"
)
_REPO_PATH_RE = re.compile(r"^[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$")


def refuse(rule: str, message: str) -> PermissionDenied:
    return PermissionDenied(f"rule {rule!r}: {message}")


def invalid(rule: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"rule {rule!r}: {message}")


# --- paths ---------------------------------------------------------------------------------------


def canonical_problem(path: str) -> str | None:
    """Why ``path`` is not a canonical absolute path, or None: absolute, no '.' or '..' component,
    no '//', no trailing '/' ('/' itself is canonical)."""
    if not path.startswith("/"):
        return "is not an absolute path"
    if path == "/":
        return None
    if path.endswith("/"):
        return "ends with '/'"
    for part in path[1:].split("/"):
        if part == "":
            return "contains '//'"
        if part in (".", ".."):
            return f"contains a {part!r} component"
    return None


def is_under(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both canonical)."""
    return root == "/" or path == root or path.startswith(root + "/")


def forbidden_source(path: str, also: Iterable[str] = ()) -> str | None:
    """The forbidden path that a canonical ``path`` is, lies under or contains; None if none."""
    for bad in (*FORBIDDEN_SOURCES, *also):
        if is_under(path, bad) or is_under(bad, path):
            return bad
    return None


def tenant_of_volume(name: str) -> str | None:
    """'t-ml-team-scratch' -> 'ml-team'; None for a name that is not of the tenant form."""
    m = _TENANT_VOLUME_RE.match(name)
    return m.group("tenant") if m else None


def tenant_volume_name(tenant: str, name: str) -> str:
    """The volume a tenant's allocations call ``name``; ValueError if it cannot be one."""
    volume = f"t-{tenant}-{name}"
    if tenant_of_volume(volume) != tenant:
        raise ValueError(f"{volume!r} is not a tenant volume name (t-<tenant>-<name>, <name> without '-')")
    return volume


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageName:
    registry: str  # "docker.io", "ghcr.io", "registry.internal:5000"
    path: str  # "library/busybox", "acme/train"


def parse_image(image: str) -> ImageName:
    """Registry and repository path of an image reference, as Docker reads it: the first component
    is a registry when it has a '.' or a ':' or is 'localhost'; otherwise the image is Docker Hub's
    (and a one-component name is under 'library/'). Tag and digest are dropped. ValueError when
    the reference cannot be read, or names an image by id (no registry says where it came from)."""
    if not image or image != image.strip():
        raise ValueError("is empty or has spaces")
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]  # the tag
    if _ID_LIKE_RE.match(name) or image.startswith("sha256:"):
        raise ValueError("names an image by id; name it by repository, e.g. docker.io/library/busybox:1.36")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first.lower(), rest
    else:
        registry, path = DOCKER_HUB, name
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
        if "/" not in path:
            path = f"library/{path}"
    if not _REGISTRY_RE.match(registry) or not _REPO_PATH_RE.match(path):
        raise ValueError("is not a valid image reference")
    return ImageName(registry, path)


def _registry_entry(entry: str) -> ImageName:
    """An allowlist entry: a registry ('ghcr.io', 'registry.internal:5000'), optionally with a
    path prefix ('ghcr.io/acme'). ValueError if malformed."""
    text = entry.strip().lower()
    registry, _, path = text.partition("/")
    if registry in _HUB_ALIASES:
        registry = DOCKER_HUB
    if not _REGISTRY_RE.match(registry) or (path and not _REPO_PATH_RE.match(path)):
        raise ValueError(f"registry allowlist entry {entry!r} is not REGISTRY[:PORT][/PATH]")
    return ImageName(registry, path)


# --- the policy ----------------------------------------------------------------------------------


def _paths(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if (problem := canonical_problem(value)) is not None:
            raise ValueError(f"bind allowlist entry {value!r} {problem}")
        if (bad := forbidden_source(value)) is not None:
            raise ValueError(f"bind allowlist entry {value!r} is, is under or contains {bad}, which is never mounted")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _volumes(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        if not _VOLUME_NAME_RE.match(value):
            raise ValueError(f"volume allowlist entry {value!r} is not a Docker volume name")
        if tenant_of_volume(value) is not None:
            raise ValueError(f"volume allowlist entry {value!r} has the form of a tenant's volume (t-<tenant>-<name>)")
        out.append(value)
    return tuple(dict.fromkeys(out))


def _registries(values: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for value in values:
        entry = _registry_entry(value)
        out.append(f"{entry.registry}/{entry.path}" if entry.path else entry.registry)
    return tuple(dict.fromkeys(out))


def split_list(value: object) -> tuple[str, ...]:
    """A list setting: comma-separated text (flags, env) or a TOML array; blanks dropped."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"{value!r} is not a list")
    return tuple(str(item).strip() for item in items if str(item).strip())


def parse_bind_allowlist(value: object) -> tuple[str, ...]:
    return _paths(split_list(value))


def parse_volume_allowlist(value: object) -> tuple[str, ...]:
    return _volumes(split_list(value))


def parse_registry_allowlist(value: object) -> tuple[str, ...]:
    return _registries(split_list(value))


@dataclass(frozen=True)
class ContainerPolicy:
    """An admin's allowlists; what never varies is in the rules above. Checked when made
    (ValueError naming the entry). More fields may come (a run-time profile, issue 14 part B):
    give each a default that keeps today's behaviour."""

    # Host directories whose contents (or sub-paths) may be bind-mounted, read-only.
    bind_allowlist: tuple[str, ...] = ()
    # Admin-made named volumes any allocation may mount, read-only.
    volume_allowlist: tuple[str, ...] = ()
    # Registries, or registry/path prefixes, images may come from.
    registry_allowlist: tuple[str, ...] = DEFAULT_REGISTRIES
    # Further paths never bind-mounted: the agent's own Docker socket when it is not the default.
    also_forbidden: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bind_allowlist", _paths(self.bind_allowlist))
        object.__setattr__(self, "volume_allowlist", _volumes(self.volume_allowlist))
        object.__setattr__(self, "registry_allowlist", _registries(self.registry_allowlist))
        for path in self.also_forbidden:
            if canonical_problem(path) is not None:
                raise ValueError(f"forbidden path {path!r} is not canonical")

    # -- the checks, in the order a caller would fix them ------------------------------------------

    def check(self, spec: tpb.ContainerSpec, *, tenant: str | None = None) -> None:
        """PermissionDenied or InvalidRequest naming the first rule ``spec`` breaks.

        ``tenant``: the allocation's tenant; None when not known yet (the agent's first check,
        before it fences), when tenant volumes are checked for their form only.
        """
        self.check_name(spec.name)
        self.check_env(spec.env)
        for i, v in enumerate(spec.volumes):
            self.check_mount(i, v.source, v.target, v.read_only, tenant=tenant)
        self.check_image(spec.image)

    @staticmethod
    def check_name(name: str) -> None:
        if not name:
            return
        if _ID_LIKE_RE.match(name):
            raise invalid(
                "container-name",
                f"container name {name!r} looks like a container id (12-64 hex digits); pick a name with other "
                "characters",
            )
        if name.lower().startswith(_RESERVED_NAME_PREFIX):
            raise invalid(
                "container-name", f"container name {name!r} starts with {_RESERVED_NAME_PREFIX!r}, kept for gpulease"
            )

    @staticmethod
    def check_env(env: Mapping[str, str]) -> None:
        for key in sorted(env):
            if reserved_env(key):
                raise invalid(
                    "env-reserved",
                    f"env {key} may not be set: NVIDIA_* and CUDA_VISIBLE_DEVICES are gpulease's, as the allocation "
                    "decides which GPUs and driver capabilities the container gets",
                )

    def check_mount(self, i: int, source: str, target: str, read_only: bool, *, tenant: str | None) -> None:
        what = f"volumes[{i}]"
        if (problem := canonical_problem(target)) is not None:
            raise invalid("mount-canonical", f"{what}.target {target[:120]!r} {problem}")
        for bad in FORBIDDEN_TARGETS:
            if is_under(target, bad):
                raise refuse(
                    "mount-target",
                    f"{what}.target {target!r} is under {bad}, from which NVIDIA's toolkit reads which GPUs to give",
                )
        if source.startswith("/"):
            self.check_bind(what, source, read_only)
        else:
            self.check_volume(what, source, read_only, tenant=tenant)

    def check_bind(self, what: str, source: str, read_only: bool) -> None:
        if (problem := canonical_problem(source)) is not None:
            raise invalid(
                "mount-canonical",
                f"{what}.source {source[:120]!r} {problem}: write bind sources as canonical absolute paths",
            )
        if (bad := forbidden_source(source, self.also_forbidden)) is not None:
            rel = "is" if source == bad else ("is under" if is_under(source, bad) else "contains")
            raise refuse("bind-forbidden", f"{what}.source {source!r} {rel} {bad}, which is never mounted")
        if not any(is_under(source, root) for root in self.bind_allowlist):
            allowed = ", ".join(self.bind_allowlist) or "none: bind mounts are off"
            raise refuse(
                "bind-allowlist",
                f"{what}.source {source!r} is not under a directory this server lets containers mount ({allowed}); "
                "use a tenant volume (t-<tenant>-<name>) for data of your own",
            )
        if not read_only:
            raise refuse(
                "bind-read-only",
                f"{what}.source {source!r} must be mounted read-only (SRC:DST:ro): allowlisted directories are shared "
                "by every allocation on the server; write to a tenant volume (t-<tenant>-<name>) instead",
            )

    def check_volume(self, what: str, name: str, read_only: bool, *, tenant: str | None) -> None:
        owner = tenant_of_volume(name)
        if owner is not None:
            if tenant is not None and owner != tenant:
                mine = f"yours are named t-{tenant}-<name>" if tenant else "this allocation has no tenant"
                raise refuse("volume-tenant", f"{what}.source: volume {name!r} belongs to tenant {owner!r}; {mine}")
            return
        if name in self.volume_allowlist:
            if not read_only:
                raise refuse(
                    "volume-read-only",
                    f"{what}.source: volume {name!r} is shared by every allocation on the server, so it is mounted "
                    "read-only (SRC:DST:ro); write to a tenant volume (t-<tenant>-<name>) instead",
                )
            return
        mine = f"t-{tenant}-<name>" if tenant else "t-<tenant>-<name>"
        raise refuse(
            "volume-allowlist",
            f"{what}.source: volume {name[:120]!r} is neither on this server's volume allowlist "
            f"({', '.join(self.volume_allowlist) or 'empty'}) nor a tenant volume ({mine}, <name> without '-')",
        )

    def check_image(self, image: str) -> None:
        try:
            ref = parse_image(image)
        except ValueError as e:
            raise refuse("image-registry", f"image {image[:120]!r} {e}") from None
        for entry in self.registry_allowlist:
            registry, _, path = entry.partition("/")
            if ref.registry == registry and (not path or ref.path == path or ref.path.startswith(path + "/")):
                return
        raise refuse(
            "image-registry",
            f"image {image[:120]!r} comes from {ref.registry}/{ref.path}, which is not on this server's registry "
            f"allowlist ({', '.join(self.registry_allowlist) or 'empty: no image may be pulled or run'})",
        )


def reserved_env(key: str) -> bool:
    """NVIDIA_* (any case) and CUDA_VISIBLE_DEVICES: never the caller's to set."""
    upper = key.upper()
    return upper.startswith("NVIDIA_") or upper == "CUDA_VISIBLE_DEVICES"


def volume_backing_problem(name: str, driver: str, options: Mapping[str, str] | None) -> str | None:
    """Why a named volume may not be mounted, from what Docker says of it; None if it may.

    Only the local driver, without a device or a bind: `docker volume create -o type=none -o o=bind
    -o device=/etc x` is a bind mount of /etc by another name."""
    if driver != "local":
        return f"volume {name!r} uses the {driver!r} driver; only 'local' volumes are mounted"
    for key, value in (options or {}).items():
        words = {w.strip().lower() for w in re.split(r"[,=\s]", str(value))}
        if key.lower() == "device" or "bind" in words or "rbind" in words or key.lower() in ("bind", "rbind"):
            return f"volume {name!r} has the option {key}={value!r}: a volume backed by a device or a bind is refused"
    return None
