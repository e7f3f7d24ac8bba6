#!/usr/bin/env bash
#SBATCH --job-name=balsam-${job_id}
#SBATCH --nodes=${num_nodes}
#SBATCH --time=${wall_time_min}
${directives}
# A Balsam batch job for Slurm: the Balsam launcher (the pilot) runs on the first node
# of the allocation and finds all nodes itself (SLURM_JOB_NODELIST, expanded with
# `scontrol show hostnames`) and the end of the allocation (squeue %e).
#
# Template syntax: Python string.Template.  Placeholders (all but $${directives}
# shell-quoted, to be used as whole shell words): $${job_id} $${queue} $${project}
# $${num_nodes} $${wall_time_min} $${job_mode} $${workdir} $${launcher_argv};
# $${directives} is the block of #SBATCH lines built from [plugins.slurm] and the job
# (partition, account, qos, constraint, reservation, exclusive, extra_directives).
# Write $$$$ for a literal dollar sign.  A site overrides this file with
# <site_dir>/templates/slurm.sh.  sbatch is called with --chdir and --output
# (<workdir>/slurm-<id>.out) on its command line.
set -u
cd -- ${workdir} || exit 1
export BALSAM_BATCH_JOB_ID=${job_id}
echo "balsam batch job $$BALSAM_BATCH_JOB_ID: slurm job $${SLURM_JOB_ID:-?} on $${SLURM_JOB_NODELIST:-?}"
exec ${launcher_argv}
