"""bonehpc: cross-validated, distilled, tuned bone-abnormality detectors on MURA, on Slurm."""

import os

# Never reach the network at run time: albumentations checks PyPI at import, timm/HF would try the hub.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
