"""DAGs that tests/e2e/test_airflow.py runs with dag.test() (through tests/support/airflow_runner.py) against a
live local cluster. Settings come from the environment, read when the file is parsed:

  GPULEASE_TEST_IMAGE  the image every container runs (default: the test dockerd's offline busybox)

The connection is AIRFLOW_CONN_GPULEASE_DEFAULT, set by the test.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG

from gpulease.airflow.operators import GpuAllocateOperator, GpuContainerOperator, GpuReleaseOperator

IMAGE = os.environ.get("GPULEASE_TEST_IMAGE", "gpulease-test/busybox:latest")
START = pendulum.datetime(2026, 1, 1, tz="UTC")
# The container says which GPUs it was given and which run it belongs to (env is templated).
SHOW = 'echo "gpus=$NVIDIA_VISIBLE_DEVICES"; echo "run=$RUN_ID"'
SMALL: dict[str, Any] = {"cpus": 1, "memory": "256MiB"}


class FlakyAllocateOperator(GpuAllocateOperator):
    """Test only: the first try fails after it has allocated (as a worker lost mid-task would)."""

    def execute(self, context: Any) -> dict[str, Any]:
        allocation = super().execute(context)
        if context["ti"].try_number == 1:
            self.log.info("FIRST-TRY-ALLOCATION %s", allocation["id"])
            raise RuntimeError("test: the first try fails after allocating")
        return allocation


def allocate_train_release(
    dag_id: str,
    command: str,
    *,
    allocate_cls: type[GpuAllocateOperator] = GpuAllocateOperator,
    allocate_kw: dict[str, Any] | None = None,
    **train: Any,
) -> DAG:
    """The documented shape: allocate >> train >> release, release a teardown of allocate."""
    with DAG(dag_id=dag_id, start_date=START, schedule=None, catchup=False, tags=["gpulease-test"]) as dag:
        allocate = allocate_cls(task_id="allocate", gpus=2, ttl=60, **SMALL, **(allocate_kw or {}))
        train.setdefault("allocation", allocate.output)
        run = GpuContainerOperator(
            task_id="train", image=IMAGE, command=command, env={"RUN_ID": "{{ run_id }}"}, **train
        )
        release = GpuReleaseOperator(task_id="release", allocation=allocate.output)
        allocate >> run >> release
        release.as_teardown(setups=allocate)
    return dag


def container_alone(dag_id: str, command: str, **kw: Any) -> DAG:
    """One task that allocates, runs and releases by itself."""
    with DAG(dag_id=dag_id, start_date=START, schedule=None, catchup=False, tags=["gpulease-test"]) as dag:
        GpuContainerOperator(
            task_id="train", gpus=2, ttl=30, image=IMAGE, command=command, env={"RUN_ID": "{{ run_id }}"},
            **SMALL, **kw,
        )  # fmt: skip
    return dag


success = allocate_train_release("gpulease_test_success", SHOW)
failing_train = allocate_train_release("gpulease_test_failing_train", f'{SHOW}; echo "about to fail"; exit 3')
retried_allocate = allocate_train_release(
    "gpulease_test_retried_allocate",
    SHOW,
    allocate_cls=FlakyAllocateOperator,
    allocate_kw={"retries": 1, "retry_delay": timedelta(0)},
)
# The allocation as a template (a dict's repr once rendered) rather than allocate.output.
deferrable = allocate_train_release(
    "gpulease_test_deferrable",
    f"sleep 2; {SHOW}",
    allocation="{{ ti.xcom_pull(task_ids='allocate') }}",
    deferrable=True,
    poll_interval=1,
)
alone = container_alone("gpulease_test_container_alone", SHOW)
alone_failing = container_alone("gpulease_test_container_alone_fails", f"{SHOW}; exit 7")
alone_deferrable = container_alone(
    "gpulease_test_container_alone_deferrable", f"sleep 2; {SHOW}", deferrable=True, poll_interval=1
)
# Fails on its first try, which releases its allocation; the retry asks again with the task's stable
# request id, finds it released (a tombstone) and asks under an id of its own.
alone_retried = container_alone(
    "gpulease_test_container_alone_retried",
    f'{SHOW}; [ "{{{{ ti.try_number }}}}" = "1" ] && exit 7; echo "second try"',
    retries=1,
    retry_delay=timedelta(0),
)
# execution_timeout cuts the task short: the operator must stop the container and release.
alone_timeout = container_alone(
    "gpulease_test_container_alone_timeout",
    'echo "started=yes"; sleep 300',
    execution_timeout=timedelta(seconds=3),
    stop_grace=1,
)

# Releasing what is already gone is a success; the id here comes from a template.
with DAG(dag_id="gpulease_test_release_twice", start_date=START, schedule=None, catchup=False) as release_twice:
    _allocate = GpuAllocateOperator(task_id="allocate", gpus=1, ttl=60, **SMALL)
    _release = GpuReleaseOperator(task_id="release", allocation=_allocate.output)
    _again = GpuReleaseOperator(task_id="release_again", allocation="{{ ti.xcom_pull(task_ids='allocate')['id'] }}")
    _allocate >> _release >> _again
