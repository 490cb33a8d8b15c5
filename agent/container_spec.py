"""What a caller may ask an agent to run: ContainerSpec and the ids of its calls, validated.

The container service (agent/containers.py) runs these checks before anything else (before it
fences, before a pull), so a malformed request costs no coordinator call and no Docker call, and
is refused with InvalidRequest naming its first problem. Apart from the service so that the rules
of what may be asked can be read, and changed, without the code that starts and stops
containers. What resources a container gets is not the caller's to say: the service takes those
from the allocation record. What a well-formed spec may ask of this server (which mounts, volumes,
env, names and images) is the container policy's: gpulease/common/container_policy.py, checked
right after these by the service, and by the coordinator before it forwards the call.
"""

from __future__ import annotations

import re

from gpulease.common.settings import ALLOCATION_ID_RE
from gpulease.errors import InvalidRequest
from gpulease.v1 import types_pb2 as tpb

MAX_IMAGE_CHARS = 512
MAX_COMMAND_ARGS = 1024
MAX_COMMAND_BYTES = 128 * 1024
MAX_ENV_ENTRIES = 256
MAX_ENV_KEY_CHARS = 256
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_PATH_CHARS = 4096
MAX_VOLUMES = 64

_CONTAINER_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_CONTAINER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_BAD_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")


def check_allocation_id(value: str) -> None:
    """InvalidRequest unless value has the shape of an allocation id."""
    if not ALLOCATION_ID_RE.match(value):
        raise InvalidRequest(
            f"allocation id {value[:80]!r} is malformed: ids are 8-64 lowercase hex characters "
            "as printed by `gpuctl allocate`"
        )


def check_container_id(value: str) -> None:
    """InvalidRequest unless value has the shape of a Docker container id or name."""
    if not _CONTAINER_REF_RE.match(value):
        raise InvalidRequest(f"container_id {value[:80]!r} is malformed")


def _check_text(what: str, value: str, max_chars: int, *, allow_empty: bool = True) -> None:
    if not value and not allow_empty:
        raise InvalidRequest(f"{what} is required")
    if len(value) > max_chars:
        raise InvalidRequest(f"{what} is too long: {len(value)} characters, at most {max_chars}")
    if "\x00" in value:
        raise InvalidRequest(f"{what} contains a NUL character")


def validate_spec(spec: tpb.ContainerSpec) -> None:
    """InvalidRequest naming the first problem of the spec, before anything else happens."""
    _check_text("image", spec.image, MAX_IMAGE_CHARS, allow_empty=False)
    if spec.image != spec.image.strip() or _BAD_CHARS_RE.search(spec.image) or " " in spec.image:
        raise InvalidRequest(f"image {spec.image[:80]!r} must not contain spaces or control characters")

    if len(spec.command) > MAX_COMMAND_ARGS:
        raise InvalidRequest(f"command has {len(spec.command)} arguments, at most {MAX_COMMAND_ARGS}")
    total = 0
    for i, arg in enumerate(spec.command):
        if "\x00" in arg:
            raise InvalidRequest(f"command argument {i} contains a NUL character")
        total += len(arg.encode())
    if total > MAX_COMMAND_BYTES:
        raise InvalidRequest(f"command is {total} bytes long, at most {MAX_COMMAND_BYTES}")

    if len(spec.env) > MAX_ENV_ENTRIES:
        raise InvalidRequest(f"env has {len(spec.env)} entries, at most {MAX_ENV_ENTRIES}")
    for key, value in spec.env.items():
        if not _ENV_KEY_RE.match(key) or len(key) > MAX_ENV_KEY_CHARS:
            raise InvalidRequest(
                f"env name {key[:80]!r} is invalid: use letters, digits, '_', '.' or '-', not starting with a digit, "
                f"at most {MAX_ENV_KEY_CHARS} characters"
            )
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            raise InvalidRequest(f"env {key} is {len(value.encode())} bytes long, at most {MAX_ENV_VALUE_BYTES}")
        if "\x00" in value:
            raise InvalidRequest(f"env {key} contains a NUL character")

    if spec.working_dir:
        _check_text("working_dir", spec.working_dir, MAX_PATH_CHARS)
        if not spec.working_dir.startswith("/"):
            raise InvalidRequest(f"working_dir {spec.working_dir[:80]!r} must be an absolute path")

    if len(spec.volumes) > MAX_VOLUMES:
        raise InvalidRequest(f"{len(spec.volumes)} volumes, at most {MAX_VOLUMES}")
    targets: set[str] = set()
    for i, v in enumerate(spec.volumes):
        _check_text(f"volumes[{i}].source", v.source, MAX_PATH_CHARS, allow_empty=False)
        _check_text(f"volumes[{i}].target", v.target, MAX_PATH_CHARS, allow_empty=False)
        if not (v.source.startswith("/") or _VOLUME_NAME_RE.match(v.source)):
            raise InvalidRequest(
                f"volumes[{i}].source {v.source[:80]!r} must be an absolute host path or a Docker volume name"
            )
        if not v.target.startswith("/") or v.target.rstrip("/") == "":
            raise InvalidRequest(f"volumes[{i}].target {v.target[:80]!r} must be an absolute path other than /")
        for what, path in (("source", v.source), ("target", v.target)):
            if ":" in path or "," in path or _BAD_CHARS_RE.search(path):
                raise InvalidRequest(
                    f"volumes[{i}].{what} {path[:80]!r} must not contain ':', ',' or control characters"
                )
        if v.target in targets:
            raise InvalidRequest(f"volumes[{i}].target {v.target!r} is mounted twice")
        targets.add(v.target)

    if spec.shm_size_bytes < 0:
        raise InvalidRequest(f"shm_size_bytes must be 0 (Docker's default) or positive, got {spec.shm_size_bytes}")

    if spec.name and not _CONTAINER_NAME_RE.match(spec.name):
        raise InvalidRequest(
            f"container name {spec.name[:80]!r} is invalid: 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
