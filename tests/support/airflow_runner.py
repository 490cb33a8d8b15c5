"""Runs real Airflow (dag.test()) in a child process for tests/e2e/test_airflow.py.

The child (``python tests/support/airflow_runner.py --home H --dags D``) configures Airflow through the
environment *before* importing it: AIRFLOW_HOME=H (a temp dir), the dags folder D, no example
DAGs, and none of the caller's AIRFLOW_* settings. It runs ``airflow db migrate`` once per home,
then answers requests, one JSON object per line on stdin, with one JSON line each on its
original stdout. Everything Airflow prints (task logs included: dag.test() runs tasks in this
process) goes to the log file instead, and each request's share of it comes back in "log".

Requests:
  {"op": "test", "dag_id": ..., "env": {...}}  dag.test() with env set for the request (the DAG
      file is parsed after env is set). Answer: the run's state and run_id, each task's state and
      try number (and earlier tries'), the XComs, the captured log.
  {"op": "parse", "folder": ...}                import errors and each DAG's tasks (setup/teardown, upstream).
  {"op": "providers"}                           what Airflow's providers manager found for gpulease.
  {"op": "exit"}

A process keeps Airflow imported and its database warm between requests: the first dag.test()
in a process takes seconds, later ones about one. ``AirflowRunner`` is the parent's side: it
bounds every wait and kills the child (its whole process group) when done or stuck.

For a look by hand: python tests/support/airflow_runner.py --home /tmp/af --dags tests/support/airflow_dags --run DAG_ID
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parents[2]
DAGS_FOLDER = Path(__file__).resolve().parent / "airflow_dags"
MIGRATED_MARKER = ".gpulease-db-migrated"
MIGRATE_TIMEOUT_S = 300
LOG_LIMIT = 512 * 1024  # characters of captured log returned per request (the end is kept)


# --------------------------------------------------------------------------------------------
# Parent side


class RunnerError(RuntimeError):
    """The runner died, timed out, or could not answer. The message has the tail of its log."""


class AirflowRunner:
    """A runner child process and its request/answer channel, every wait bounded."""

    def __init__(self, home: Path, log_path: Path, dags: Path = DAGS_FOLDER) -> None:
        self.home, self.log_path, self.dags = home, log_path, dags
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # The child sets up its own Airflow environment; PYTHONPATH makes it import this checkout.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        argv = [sys.executable, str(Path(__file__).resolve()), "--home", str(self.home), "--dags", str(self.dags)]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=ROOT,
                start_new_session=True,
            )  # fmt: skip
        self._buffer = b""

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log at {self.log_path}: {e.strerror})"
        return "\n".join(text.splitlines()[-lines:])

    def request(self, payload: Mapping[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and wait (at most timeout seconds) for its answer. On a timeout or a
        dead child the child is killed (the next request starts a fresh one) and RunnerError raised."""
        if not self.alive:
            self.start()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(payload).encode() + b"\n")
            proc.stdin.flush()
        except OSError as e:
            self.stop(grace=0)
            raise RunnerError(f"the Airflow runner is gone ({e}); its log ends:\n{self.log_tail()}") from None
        line = self._read_line(proc, timeout)
        if line is None:
            what = "exited" if proc.poll() is not None else f"did not answer within {timeout:.0f}s"
            self.stop(grace=0)  # stuck: no polite exit
            raise RunnerError(f"the Airflow runner {what} ({payload.get('op')}); its log ends:\n{self.log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _read_line(self, proc: subprocess.Popen[bytes], timeout: float) -> bytes | None:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if not sel.select(min(left, 1.0)):
                    if proc.poll() is not None:  # died with nothing more to say
                        return None
                    continue
                data = os.read(fd, 1 << 16)
                if not data:  # EOF: the child exited
                    return None
                self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def stop(self, grace: float = 10.0) -> None:
        """Ask the child to exit, wait up to grace seconds, then kill its process group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if grace > 0 and proc.poll() is None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(b'{"op": "exit"}\n')
                proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)
        if proc.poll() is None:
            # Its own session: the group is the child and anything it started.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# --------------------------------------------------------------------------------------------
# Child side: nothing below imports Airflow before configure() has set the environment.


def configure(home: Path, dags: Path) -> None:
    # None of the caller's Airflow configuration, but its connections and variables (for --run).
    keep = ("AIRFLOW_CONN_", "AIRFLOW_VAR_")
    for key in [k for k in os.environ if k.startswith("AIRFLOW") and not k.startswith(keep)]:
        del os.environ[key]
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
        }
    )


def migrate(home: Path) -> None:
    marker = home / MIGRATED_MARKER
    if marker.exists():
        return
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "db", "migrate"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S, env=dict(os.environ),
    )  # fmt: skip
    sys.stderr.write(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"airflow db migrate exited with {out.returncode}")
    marker.write_text("ok\n")


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Send this process's fds 1 and 2 to a temp file meanwhile; the list gets its text at the end."""
    result: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            # Also keep it in the runner's log, for a look after a failure.
            sys.stderr.write(text)
            sys.stderr.flush()
            result.append(text)


@contextlib.contextmanager
def environment(overrides: Mapping[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _value(state: Any) -> Any:
    return getattr(state, "value", state)


def run_dag(dag_id: str) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.taskinstancehistory import TaskInstanceHistory
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    if bag.import_errors:
        return {"ok": False, "error": f"import errors: {bag.import_errors}"}
    dag = bag.get_dag(dag_id)
    if dag is None:
        return {"ok": False, "error": f"no DAG {dag_id!r} in {sorted(bag.dag_ids)}"}
    started = time.monotonic()
    dr = dag.test()
    seconds = time.monotonic() - started
    tasks: dict[str, Any] = {}
    xcoms: dict[str, Any] = {}
    with create_session() as session:
        for ti in session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == dr.run_id)
        ):
            tasks[ti.task_id] = {"state": _value(ti.state), "try_number": ti.try_number, "map_index": ti.map_index}
        for h in session.scalars(
            select(TaskInstanceHistory).where(
                TaskInstanceHistory.dag_id == dag_id, TaskInstanceHistory.run_id == dr.run_id
            )
        ):
            tasks.setdefault(h.task_id, {}).setdefault("earlier_tries", []).append(
                {"try_number": h.try_number, "state": _value(h.state)}
            )
        x: Any
        for x in session.scalars(XComModel.get_many(run_id=dr.run_id, dag_ids=dag_id)):
            xcoms.setdefault(x.task_id, {})[x.key] = XComModel.deserialize_value(x)
    return {
        "ok": True,
        "dag_id": dag_id,
        "run_id": dr.run_id,
        "state": _value(dr.state),
        "tasks": tasks,
        "xcoms": xcoms,
        "seconds": round(seconds, 3),
    }


def parse_folder(folder: str) -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=folder)
    dags = {}
    for dag_id in bag.dag_ids:
        dag = bag.get_dag(dag_id)
        assert dag is not None
        dags[dag_id] = {
            t.task_id: {
                "type": type(t).__name__,
                "is_setup": t.is_setup,
                "is_teardown": t.is_teardown,
                "upstream": sorted(t.upstream_task_ids),
                "trigger_rule": _value(t.trigger_rule),
            }
            for t in dag.tasks
        }
    return {"ok": True, "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()}, "dags": dags}


def providers() -> dict[str, Any]:
    manager: Any
    try:
        from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime

        manager = ProvidersManagerTaskRuntime()  # type: ignore[no-untyped-call,unused-ignore]
    except ImportError:  # before Airflow 3.2
        from airflow.providers_manager import ProvidersManager

        manager = ProvidersManager()  # type: ignore[no-untyped-call,unused-ignore]
    info = manager.providers.get("gpulease")
    hook = manager.hooks.get("gpulease")
    return {
        "ok": True,
        "provider": None if info is None else {"version": info.version, "data": info.data},
        "hook": None if hook is None else {"class": hook.hook_class_name, "attr": hook.connection_id_attribute_name},
    }


def handle(request: Mapping[str, Any]) -> dict[str, Any]:
    op = request.get("op")
    with environment(request.get("env") or {}), captured_output() as log:
        try:
            if op == "test":
                answer = run_dag(str(request["dag_id"]))
            elif op == "parse":
                answer = parse_folder(str(request["folder"]))
            elif op == "providers":
                answer = providers()
            else:
                answer = {"ok": False, "error": f"unknown op {op!r}"}
        except BaseException:
            answer = {"ok": False, "error": traceback.format_exc()}
    text = log[0] if log else ""
    answer["log"] = text[-LOG_LIMIT:]
    return answer


def serve(results: TextIO) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            return
        results.write(json.dumps(handle(request), default=str) + "\n")
        results.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, required=True, help="AIRFLOW_HOME (made if missing)")
    parser.add_argument("--dags", type=Path, default=DAGS_FOLDER, help="the dags folder")
    parser.add_argument("--run", metavar="DAG_ID", help="run this DAG once, print the answer and exit")
    args = parser.parse_args(argv)
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    configure(home, args.dags.resolve())
    # Answers go to the original stdout; whatever else writes to fd 1 joins stderr (the log).
    results = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    migrate(home)
    if args.run:
        answer = handle({"op": "test", "dag_id": args.run})
        results.write(json.dumps(answer, default=str, indent=2) + "\n")
        return 0 if answer.get("ok") else 1
    serve(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
