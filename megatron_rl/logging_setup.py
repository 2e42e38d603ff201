"""Logging for launched processes: rank-prefixed lines, quiet third-party warnings."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Non-zero ranks report warnings and errors only.
    if rank != "0":
        logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("megatron.core", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # megatron-core warns at import that Transformer Engine / Apex are missing (expected on CPU).
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
