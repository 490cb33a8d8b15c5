"""deploy/prometheus/rules.yml and deploy/grafana/gpulease.json (issue 16, part 3), checked by the
real promtool: the rules load, their unit tests (deploy/prometheus/rules_test.yml) prove the key
alerts fire, and every PromQL query of the dashboard parses. Whether the metrics they name exist
is tests/etcd/test_metric_names.py's job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gpulease.json"
RUNBOOK = ROOT / "docs" / "operations.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("GPULEASE_REQUIRE_DOCKER") == "1":
            pytest.fail("promtool is missing: install Debian's prometheus package (.ci/run does)")
        pytest.skip("promtool is missing (Debian's prometheus package provides it; .ci/run installs it)")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = run("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def alerts() -> dict[str, str]:
    """Each alert's name and text (up to the next rule), read crudely: promtool has checked the YAML."""
    parts = re.split(r"^\s*- alert: *", RULES.read_text(), flags=re.M)[1:]
    return {part.split("\n", 1)[0].strip(): part for part in parts}


def test_every_alert_has_a_severity_a_summary_and_a_runbook_entry() -> None:
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', RUNBOOK.read_text()))
    found = alerts()
    assert len(found) >= 15
    for name, text in found.items():
        assert re.search(r"^\s+severity: (critical|warning|info)$", text, re.M), name
        assert re.search(r"^\s+summary: ", text, re.M) and re.search(r"^\s+description: ", text, re.M), name
        runbook = f"alert-{name.lower()}"
        assert f'runbook: "docs/operations.md#{runbook}"' in text, name
        assert runbook in anchors, f"docs/operations.md has no entry for {name}"


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and the templating variables'."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    """promtool has no offline expression checker: the panels' queries (Grafana's variables
    substituted) go into a recording-rule file, which `promtool check rules` parses."""
    dash = json.loads(DASHBOARD.read_text())
    assert {v["name"] for v in dash["templating"]["list"]} >= {"DS_PROMETHEUS"}
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    records = []
    for i, expr in enumerate(dashboard_queries()):
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        expr = expr.replace("$__rate_interval", "5m").replace("$node", ".*")
        records.append({"record": f"dashboard:query:{i}", "expr": expr})
    assert len(records) > 20
    file = tmp_path / "dashboard_rules.yml"  # JSON is YAML
    file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = run("check", "rules", str(file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
