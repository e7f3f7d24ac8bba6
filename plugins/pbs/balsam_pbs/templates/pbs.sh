#!/usr/bin/env bash
#PBS -N balsam-${job_id}
#PBS -l walltime=${walltime}
${directives}
# A Balsam batch job for PBS Pro / Torque: the Balsam launcher (the pilot) runs on the
# first node and finds all nodes itself (PBS_NODEFILE); BALSAM_JOB_END_TIME tells it
# when the allocation ends (start of this script + wall time, epoch seconds).
#
# Template syntax: Python string.Template.  Placeholders (all but $${directives} and
# $${walltime} shell-quoted, to be used as whole shell words): $${job_id} $${queue}
# $${project} $${num_nodes} $${wall_time_min} $${job_mode} $${workdir}
# $${launcher_argv}; $${walltime} is HH:MM:00; $${directives} is the block of #PBS lines
# built from [plugins.pbs] and the job (nodes, queue, account, extra_directives).
# Write $$$$ for a literal dollar sign.  A site overrides this file with
# <site_dir>/templates/pbs.sh.  qsub is called with -o/-e (<workdir>/pbs.out, pbs.err).
set -u
start=$${EPOCHSECONDS:-$$(date +%s)}
cd -- ${workdir} || exit 1
export BALSAM_BATCH_JOB_ID=${job_id}
export BALSAM_JOB_END_TIME=$$(( start + ${wall_time_min} * 60 ))
echo "balsam batch job $$BALSAM_BATCH_JOB_ID: pbs job $${PBS_JOBID:-?}, ends at $$BALSAM_JOB_END_TIME"
exec ${launcher_argv}
