#!/usr/bin/env bash
#COBALT -n ${num_nodes}
#COBALT -t ${wall_time_min}
${directives}
# A Balsam batch job for Cobalt: the Balsam launcher (the pilot) finds its nodes itself
# (COBALT_PARTNAME ranges, or COBALT_NODEFILE); BALSAM_JOB_END_TIME tells it when the
# allocation ends (start of this script + wall time, epoch seconds).
#
# Template syntax: Python string.Template.  Placeholders (all but $${directives}
# shell-quoted, to be used as whole shell words): $${job_id} $${queue} $${project}
# $${num_nodes} $${wall_time_min} $${job_mode} $${workdir} $${launcher_argv};
# $${directives} is the block of #COBALT lines built from [plugins.cobalt] and the job
# (queue, project, attrs, extra_directives).  Write $$$$ for a literal dollar sign.
# A site overrides this file with <site_dir>/templates/cobalt.sh.  qsub is called with
# --cwd, -o, -e and --debuglog (<workdir>/cobalt.out, .err, .log) on its command line.
set -u
start=$${EPOCHSECONDS:-$$(date +%s)}
cd -- ${workdir} || exit 1
export BALSAM_BATCH_JOB_ID=${job_id}
export BALSAM_JOB_END_TIME=$$(( start + ${wall_time_min} * 60 ))
echo "balsam batch job $$BALSAM_BATCH_JOB_ID: cobalt job $${COBALT_JOBID:-?} on $${COBALT_PARTNAME:-?}"
exec ${launcher_argv}
