"""Facts shared by the job layer, the trainers, the evaluator and the report (torch-free)."""

from __future__ import annotations

# `python -m bonehpc.train` exits with this code when it stopped on SIGUSR2/SIGTERM with last.pt on disk.
PREEMPTED_EXIT_CODE = 3
# A bonehpc input error (bad config, bad data, missing file): one line on stderr, this exit code.
INPUT_ERROR_EXIT_CODE = 2

# Columns of every predictions CSV (predictions_val.csv, holdout predictions.csv, predict's images.csv).
PRED_COLUMNS = ("image_id", "study", "body_part", "label", "prob")

# An image or a study is called abnormal when its probability is above this (MURA protocol).
THRESHOLD = 0.5
