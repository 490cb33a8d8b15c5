"""Tests against a real etcd: coordinator processes or in-process coordinator cores, and the
client against them; no agent processes, no dockerd, no Airflow."""
