"""bonehpc: cross-validated, distilled, tuned bone-abnormality detectors on MURA, on Slurm."""

import os

__version__ = "0.1.0"


def offline_env(hub: bool = True) -> None:
    """Never reach the network at run time: albumentations checks PyPI at import, timm/HF would try the hub.

    Called by the entry points (the console script's main, the jobs package) before anything heavy is
    imported, never on `import bonehpc`; a value already in the environment wins. `hub=False` leaves
    HF_HUB_OFFLINE alone (`bonehpc weights` is the one command that downloads).
    """
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    if hub:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
