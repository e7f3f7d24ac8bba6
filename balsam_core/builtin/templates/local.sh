#!/usr/bin/env bash
# A Balsam batch job for the "local" scheduler.
#
# There is no batch system: the local scheduler starts this script as a detached
# process (its own session and process group) on this machine, and the script *is*
# the allocation.  It runs the Balsam launcher, tells it when the allocation ends
# (BALSAM_LOCAL_END_TIME, epoch seconds = start + wall time) and, once the launcher
# has exited, writes its exit status to the file "exit_code" next to this script,
# which the scheduler's status() reads.  Cancelling sends SIGTERM to the whole process
# group, then SIGKILL after a grace period.
#
# Template syntax: Python string.Template.  Placeholders, already shell-quoted, each
# to be used as whole shell words (never inside quotes):
#   $${job_id} $${queue} $${project} $${num_nodes} $${wall_time_min} $${job_mode}
#   $${workdir} $${launcher_argv} (the whole command line); keep them out of
#   comments: a quoted value may span lines.
# A literal dollar sign is written "$$$$".  A site overrides this file with
# <site_dir>/templates/local.sh.
set -u

script_dir=$$(cd -- "$$(dirname -- "$${BASH_SOURCE[0]}")" && pwd -P) || exit 1
rm -f -- "$$script_dir/exit_code"
cd -- ${workdir} || exit 1

start=$${EPOCHSECONDS:-$$(date +%s)}
export BALSAM_BATCH_JOB_ID=${job_id}
export BALSAM_LOCAL_END_TIME=$$(( start + ${wall_time_min} * 60 ))
echo "balsam local job $$BALSAM_BATCH_JOB_ID: started at $$start, allocation ends at $$BALSAM_LOCAL_END_TIME"

# On SIGTERM (cancel), the launcher in the foreground gets the signal too and stops
# cleanly; bash runs this trap only after the launcher has exited, so the exit status
# below is still recorded.
trap 'echo "balsam local job $$BALSAM_BATCH_JOB_ID: SIGTERM received" >&2' TERM

${launcher_argv}
rc=$$?

printf '%s\n' "$$rc" > "$$script_dir/exit_code.tmp" && mv -f -- "$$script_dir/exit_code.tmp" "$$script_dir/exit_code"
echo "balsam local job $$BALSAM_BATCH_JOB_ID: launcher exited with status $$rc"
exit "$$rc"
