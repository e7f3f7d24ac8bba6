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

step balsam app ls
balsam app ls
step balsam task ls --workflow sweep --limit 8
balsam task ls --workflow sweep --limit 8
step balsam task ls --workflow sweep --tree --limit 60 '| head -20'
balsam task ls --workflow sweep --tree --limit 60 | head -20
step balsam task add simulate --param x=9.9 --workflow sweep --tag group=extra
balsam task add simulate --param x=9.9 --workflow sweep --tag group=extra
step balsam task ls --tag group=extra
balsam task ls --tag group=extra
step balsam task kill 2 '  # a simulation: its reduction and the report can no longer run'
balsam task kill 2
step balsam task history 54
balsam task history 54
step balsam site info
balsam site info
step balsam task add simulate --param x=1 -n -2 '  # bad input: one line, exit 2'
balsam task add simulate --param x=1 -n -2 || echo "(exit code $?)"

echo
echo "Site: $SITE   (export BALSAM_SITE=$SITE to keep exploring)"
echo "Running the tasks is the launcher's job: 'balsam launcher' arrives with the launcher issue."
