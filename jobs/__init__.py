"""Thin submitit entry points: picklable callables that the job graph of bonehpc.slurm submits.

Each one reads the experiment's saved config.yaml in the job, so a requeued or resubmitted job
picks up exactly what was submitted; training jobs are submitit Checkpointables.
"""
