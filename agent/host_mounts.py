"""The container policy's checks that need this host (gpulease/common/container_policy.py has the rest).

A bind source that the policy allows by name is opened here one component at a time, from '/',
each with O_PATH | O_NOFOLLOW relative to the previous one: a component that is a symlink is
opened as the link itself, seen by fstat, and refused (rule 'bind-symlink'), wherever it is in
the path, so a link planted in an allowlisted directory cannot lead a mount to /etc or the Docker
socket. The last component must be a directory or a regular file (rule 'bind-file-type': no
sockets, devices or FIFOs). This is the lstat walk of the issue, on file descriptors, so no
component can be swapped between two steps of the walk.

What remains is the time between this check and dockerd's mount. The agent checks right before
it creates the container (again after the image pull), and no container can write to an
allowlisted directory (bind mounts are read-only, rule 'bind-read-only'): only a process on the
host itself could swap a directory for a link in that window.

Named volumes are judged from Docker's answer (``ContainerRuntime.inspect_volume``) by
``volume_backing_problem``; tenant volumes are made by the agent (``create_volume``) on first use.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from gpulease.common.container_policy import invalid, refuse


def check_bind_source(what: str, path: str) -> None:
    """PermissionDenied unless no component of the canonical absolute ``path`` is a symlink and it
    is a directory or a regular file; InvalidRequest when it does not exist."""
    parts = [p for p in path.split("/") if p]
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walked = ""
        for n, part in enumerate(parts, 1):
            walked += "/" + part
            try:
                nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                raise invalid(
                    "bind-source", f"{what}.source {path!r} does not exist on this node ({walked} is missing)"
                ) from None
            except NotADirectoryError:
                raise invalid(
                    "bind-source", f"{what}.source {path!r} does not exist on this node ({walked} is not a directory)"
                ) from None
            except OSError as e:
                if e.errno == errno.ELOOP:  # not expected with O_PATH | O_NOFOLLOW; refused all the same
                    raise refuse("bind-symlink", f"{what}.source {path!r}: {walked} is a symlink") from None
                raise refuse(
                    "bind-source", f"{what}.source {path!r} cannot be checked ({walked}: {e.strerror})"
                ) from None
            os.close(fd)
            fd = nxt
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise refuse(
                    "bind-symlink",
                    f"{what}.source {path!r}: {walked} is a symlink; bind sources are resolved with no symlink in any "
                    "component",
                )
            if n < len(parts) and not stat.S_ISDIR(mode):
                raise invalid("bind-source", f"{what}.source {path!r} does not exist ({walked} is not a directory)")
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            raise refuse(
                "bind-file-type",
                f"{what}.source {path!r} is neither a directory nor a regular file (a socket, device or FIFO is never "
                "mounted)",
            )
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
