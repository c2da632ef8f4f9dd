"""What a launcher (ours or torchrun) told this process, read without importing torch.

Kept apart from `compressor.distributed` so the CLI's entry point can ask "am I one of
several workers?" before deciding whether torch is needed at all.
"""

from __future__ import annotations

import os


def world_size_from_env() -> int:
    """The number of processes a launcher (ours or torchrun) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """True when a launcher (ours or torchrun) started this process as one of several."""
    return world_size_from_env() > 1
