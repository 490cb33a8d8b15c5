# Shared by scripts/test and scripts/demo: create .venv with Python >= 3.11 and install the
# project with its dev extra. Re-installs only when pyproject.toml changed since the last run.
ensure_venv() {
  local py
  for py in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then break; fi
    py=""
  done
  if [ -z "$py" ]; then echo "need Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; fi
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  local stamp=.venv/.gpulease-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "setting up .venv (pip install -e '.[dev]') ..."
    # pip's output goes to a log, shown only when the install fails.
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e '.[dev]'; } \
        > .venv/pip-install.log 2>&1; then
      tail -n 40 .venv/pip-install.log >&2
      echo "pip install failed; full log in .venv/pip-install.log" >&2
      exit 1
    fi
    touch "$stamp"
  fi
}
