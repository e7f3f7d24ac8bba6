#!/usr/bin/env bash
# The project's single test command:  bash scripts/test.sh [pytest args...]
#
# Creates (or reuses) a virtualenv at ${BALSAM_VENV:-.venv} (relative paths are
# relative to the repo root), installs the package with its test and postgres
# extras and every plugin distribution under plugins/, installs missing system
# packages for the real-component tests, then runs pytest from the repo root. With CI=true, BALSAM_REQUIRE_REAL=1 is
# exported so skipped real-component tests fail instead.
# Exit code: pytest's, except 5 (no tests collected) becomes 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
log() { echo "[test.sh] $*" >&2; }

VENV=${BALSAM_VENV:-.venv}
PY=$VENV/bin/python

if [[ ! -x $PY ]]; then
  log "creating virtualenv $VENV"
  python3 -m venv "$VENV" || {
    log "python3 -m venv failed (on Debian: apt-get install python3-venv)"
    exit 1
  }
fi

# The core with its extras, and every plugin distribution under plugins/.
install_args=(-e '.[test,postgres]')
for project in plugins/*/pyproject.toml; do
  install_args+=(-e "$(dirname "$project")")
done

# pip install only when a pyproject.toml (or the interpreter) changed since the
# last successful install; plain `pip install` upgrades nothing already satisfied.
STAMP=$VENV/.balsam-install-stamp
want_stamp="$(cat pyproject.toml plugins/*/pyproject.toml | sha256sum | cut -d' ' -f1) $("$PY" -c 'import sys; print(sys.version)')"
if [[ ! -f $STAMP || $(<"$STAMP") != "$want_stamp" ]]; then
  log "pip install ${install_args[*]}"
  "$PY" -m pip install -q --disable-pip-version-check "${install_args[@]}"
  printf '%s\n' "$want_stamp" >"$STAMP"
fi

# Real components (PostgreSQL, ...): install if missing. A failure here is not
# fatal: the affected tests skip (or fail when BALSAM_REQUIRE_REAL=1).
if ! bash scripts/install-system-deps.sh --check 2>/dev/null; then
  bash scripts/install-system-deps.sh || log "WARNING: could not install system dependencies"
fi

if [[ ${CI:-} == true ]]; then
  export BALSAM_REQUIRE_REAL=1
fi

rc=0
"$PY" -m pytest -q "$@" || rc=$?
if ((rc == 5)); then
  log "pytest collected no tests"
  rc=1
fi
exit "$rc"
