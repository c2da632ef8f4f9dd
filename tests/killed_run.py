"""`python tests/killed_run.py N compress-args...`: runs the CLI and SIGKILLs itself at the
N-th SGD step, the way an out-of-memory killer or a pre-empted machine would (tests only)."""

from __future__ import annotations

import os
import signal
import sys

import torch

torch.set_num_threads(1)
KILL_AT = int(sys.argv[1])
_step = torch.optim.SGD.step
_calls = 0


def _counting_step(self, *args, **kwargs):
    global _calls
    _calls += 1
    if _calls == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self, *args, **kwargs)


torch.optim.SGD.step = _counting_step

if __name__ == "__main__":
    from cli.main import main

    sys.argv = ["compress", *sys.argv[2:]]
    main()
