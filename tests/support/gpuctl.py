"""gpuctl as a subprocess, as a user runs it: what it printed and how it exited."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpulease.dev import procs

CLI_TIMEOUT_S = 30


@dataclass
class Run:
    argv: list[str]
    rc: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError as e:
            raise AssertionError(f"{self} did not print JSON: {e}") from None

    def __str__(self) -> str:
        return f"gpuctl {' '.join(self.argv)} (exit {self.rc})\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT_S) -> Run:
    """`gpuctl ARGV` with env added to a clean environment (no inherited GPULEASE_*: a developer's
    GPULEASE_COORDINATOR would change what is tested). Never a traceback."""
    child_env = procs.python_child_env(env, drop_prefixes=("GPULEASE_",))
    done = subprocess.run(
        [sys.executable, "-m", "gpulease.cli.main", *argv],
        capture_output=True,
        text=True,
        env=child_env,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    result = Run(list(argv), done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in result.stderr, str(result)
    return result
