"""Entry points (picklable submitit callables: TrainTask, EvaluateTask, PackShardTask, FinalizePackTask,
TuneTask) and the job graphs that submit them (jobs.submit), plus the end-to-end demo (jobs.demo).

Each entry point reads the experiment's saved config.yaml in the job, so a requeued or resubmitted job
picks up exactly what was submitted; training jobs are submitit Checkpointables. Layering:
bonehpc.cli -> jobs -> bonehpc (bonehpc never imports jobs).
"""

from bonehpc import offline_env

offline_env()  # job processes (submitit unpickles an entry point from here) never reach the network
