"""The Slurm backend: an sbatch script, states from squeue/sacct, logs from the shared run directory."""
