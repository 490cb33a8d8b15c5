"""The committed gpulease/v1 stubs are exactly what scripts/gen-proto generates from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GEN_PROTO = REPO / "scripts" / "gen-proto"
COMMITTED = REPO / "gpulease" / "v1"
HINT = "the committed stubs are stale: run scripts/gen-proto and commit the files in gpulease/v1"


def generated_files(directory: Path) -> set[str]:
    """Names of the generated stubs in directory (not __init__.py, caches or other files)."""
    return {p.name for p in directory.iterdir() if p.is_file() and "_pb2" in p.name and p.suffix in (".py", ".pyi")}


def test_committed_stubs_match_gen_proto_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # gen-proto runs `python -m grpc_tools.protoc` and the protoc-gen-mypy plugins: the venv's.
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])}
    done = subprocess.run(
        [str(GEN_PROTO), str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, f"scripts/gen-proto failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"

    generated_dir = out / "gpulease" / "v1"
    assert generated_dir.is_dir(), f"scripts/gen-proto wrote nothing under {generated_dir}"
    # Everything it writes under gpulease/v1 is a stub.
    everything = {p.relative_to(generated_dir).as_posix() for p in generated_dir.rglob("*") if p.is_file()}
    generated = generated_files(generated_dir)
    assert everything == generated, f"unexpected output of scripts/gen-proto: {sorted(everything - generated)}"
    assert {"coordinator_pb2.py", "coordinator_pb2_grpc.py", "types_pb2.py", "agent_pb2.py"} <= generated

    committed = generated_files(COMMITTED)
    assert committed == generated, (
        f"{HINT}\nonly generated: {sorted(generated - committed)}\nonly committed: {sorted(committed - generated)}"
    )
    differing = sorted(n for n in generated if (generated_dir / n).read_bytes() != (COMMITTED / n).read_bytes())
    assert not differing, f"{HINT}\ndiffering: {differing}"
