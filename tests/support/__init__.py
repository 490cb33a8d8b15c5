"""Helpers shared by the tests in tests/unit, tests/etcd and tests/e2e: the one place they live."""
