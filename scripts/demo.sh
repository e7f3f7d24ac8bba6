#!/usr/bin/env bash
# The README's first command: set up Balsam in a fresh virtualenv, create a site on the
# embedded defaults (SQLite, local scheduler, direct launcher) and build the example
# workflow in it, showing what a user sees at each step.
#   bash scripts/demo.sh [SITE_DIR]      (default: a new directory under /tmp)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${BALSAM_VENV:-$ROOT/.venv}
SITE=${1:-$(mktemp -d /tmp/balsam-demo.XXXXXX)/site}
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

if [[ ! -x $VENV/bin/python ]]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT"
export PATH=$VENV/bin:$PATH
unset BALSAM_SITE

step balsam site init "$SITE"
balsam site init "$SITE"
export BALSAM_SITE=$SITE

step python examples/dag_workflow.py
python "$ROOT/examples/dag_workflow.py"

step balsam task ls --workflow sweep --tree --limit 60 '| head -12'
balsam task ls --workflow sweep --tree --limit 60 | head -12

step balsam launcher --idle-timeout 3 '&   # the pilot, on this machine'
balsam launcher --idle-timeout 3 2>"$SITE/log/demo-launcher.log" &
LAUNCHER=$!
trap 'kill $LAUNCHER 2>/dev/null || true' EXIT
step balsam task wait --workflow sweep --interval 0.5
balsam task wait --workflow sweep --interval 0.5 || true
wait "$LAUNCHER" || true
trap - EXIT
tail -1 "$SITE/log/demo-launcher.log"

step balsam task ls --workflow sweep --tag group=spawned '  # added by a running task'
balsam task ls --workflow sweep --tag group=spawned
id_of() { balsam task ls --workflow sweep --limit 100 --json | python3 -c \
  "import json, sys; print(next(t['id'] for t in json.load(sys.stdin) if t['name'] == '$1'))"; }
FLAKY=$(id_of flaky)
SLOW=$(id_of slow)
step balsam task history "$FLAKY" '  # failed, then repaired by its error handler'
balsam task history "$FLAKY"
step balsam task history "$SLOW" '  # timed out, retried'
balsam task history "$SLOW"
step balsam report --wf sweep
balsam report --wf sweep || true

echo
echo "Site: $SITE   (export BALSAM_SITE=$SITE to keep exploring)"
