"""Unit tests: pure logic, parsing, generated code and rules on the source; no processes, no etcd
(fake servers in process are fine)."""
