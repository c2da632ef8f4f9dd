"""Run checkpoints: a compression run that survives being killed, and the per-epoch rank check.

A method's schedule is a sequence of training phases, each one `train.fit` call (BAR: gated
training, then fine-tuning the slimmed network; ProbMask: scores, then fine-tuning). Inside a
`session(...)`, `fit` numbers its calls and, at every epoch boundary, writes one file
(atomically: temp + rename) holding

  - the position: phase number and name, epochs done;
  - the current phase's model, optimiser, LR schedule, the method's own state
    (`Method.state_dict()`: BAR's log alpha and gate optimiser, ProbMask's score optimiser
    and temperature, ...), and the torch and data-loader RNG states;
  - a snapshot of model, method and RNG states at the end of every finished phase;
  - the run's fingerprint (method, config, budget, seed, input model and data digests,
    number of processes).

`--resume` replays the method's code from the start with the same seed: a finished phase is
not trained again but loads its end snapshot, so the code between phases (hard pruning,
slimming, BatchNorm re-estimation) runs on exactly the state it saw the first time and
rebuilds the same structure; the interrupted phase loads its state and continues at the
epoch boundary. The result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor import distributed, filebounds
from compressor.errors import InputError, first_line

FORMAT = "compressor.run-checkpoint"
VERSION = 1


def rng_state(loader) -> dict:
    """torch's and the loader's RNG states, as a checkpoint stores them."""
    generator = getattr(loader, "generator", None)
    return {
        "torch_rng": torch.get_rng_state(),
        "loader_rng": generator.get_state() if generator is not None else None,
    }


def restore_rng(state: dict, loader) -> None:
    """Puts back what `rng_state` saved (the loader's part when it has a generator)."""
    torch.set_rng_state(state["torch_rng"])
    generator = getattr(loader, "generator", None)
    if generator is not None and state["loader_rng"] is not None:
        generator.set_state(state["loader_rng"])


def read(path: str | Path) -> object:
    """`torch.load` (tensors and plain containers only) of a checkpoint file.

    Raises:
        InputError: the file cannot be read as one (damaged, truncated, not torch's).
    """
    filebounds.check_torch_file(path, "checkpoint")  # before torch allocates what it declares
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise InputError(f"checkpoint {str(path)!r} does not fit in memory") from None
    except Exception as exc:  # a damaged file raises many types
        first = first_line(exc)
        raise InputError(f"checkpoint {str(path)!r} is damaged: {first}") from None


def restore_training(path, state: dict, model, optimizer=None, scheduler=None) -> None:
    """Loads `state`'s model, optimiser and schedule (each when given) into the live objects.

    Raises:
        InputError: the checkpoint was made for another model or optimiser.
    """
    try:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise InputError(
            f"checkpoint {str(path)!r} does not match this model/run: {first}"
        ) from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])


def _clone(state):
    """A deep copy of a (nested) state dict, detached from the live tensors."""
    return copy.deepcopy(state)


@dataclass
class Session:
    """What `fit` needs to checkpoint, resume and check a run; see the module docstring."""

    path: Path | None = None
    fingerprint: dict = field(default_factory=dict)
    method: object = None  # has state_dict() / load_state_dict()
    check_ranks: bool = False
    resume: dict | None = None
    snapshots: list[dict] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    checks: int = 0  # rank checks passed

    def _method_state(self) -> dict:
        return self.method.state_dict() if self.method is not None else {}

    def _load_method(self, state: dict) -> None:
        if self.method is not None:
            self.method.load_state_dict(state)

    def begin_phase(self, name: str) -> int:
        """Numbers the next `fit` call; checks it against the run being resumed."""
        index = len(self.phases)
        self.phases.append(name)
        if self.resume is not None and index < len(self.resume["phases"]):
            expected = self.resume["phases"][index]
            if expected != name:
                raise InputError(
                    f"checkpoint {str(self.path)!r} was written by a run whose phase "
                    f"{index} is {expected!r}, but this run's is {name!r}; "
                    "resume with the same command that wrote it"
                )
        return index

    def finished(self, index: int) -> bool:
        """True for a phase the resumed run had already finished (replayed, not trained)."""
        return self.resume is not None and index < len(self.resume["snapshots"])

    def restore_finished(self, index: int, model: nn.Module, loader) -> None:
        snap = self.resume["snapshots"][index]
        restore_training(self.path, snap, model)
        self._load_method(snap["method"])
        restore_rng(snap, loader)
        self.snapshots.append(snap)

    def restore_current(self, index: int, model, optimizer, scheduler, loader) -> int:
        """Loads the interrupted phase's state; returns the epoch to start at (else 0)."""
        resume = self.resume
        if resume is None or resume["phase"] != index:
            return 0
        current = resume["current"]
        restore_training(self.path, current, model, optimizer, scheduler)
        self._load_method(current["method"])
        restore_rng(current, loader)
        return resume["epoch"]

    def epoch_end(self, index, epoch, epochs, model, optimizer, scheduler, loader) -> None:
        """Rank check (when asked), phase snapshot (last epoch), checkpoint (rank 0)."""
        if self.check_ranks:
            self.check(f"phase {self.phases[index]!r} epoch {epoch}", model)
        if epoch == epochs:
            self.snapshots.append(
                {
                    "model": _clone(model.state_dict()),
                    "method": _clone(self._method_state()),
                    **rng_state(loader),
                }
            )
        if self.path is None or not distributed.is_main():
            return
        state = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "phases": list(self.phases),
            "phase": index,
            "epoch": epoch,
            "current": {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "method": self._method_state(),
                **rng_state(loader),
            },
            "snapshots": self.snapshots,
        }
        from compressor.io import atomic_write

        atomic_write(self.path, lambda tmp: torch.save(state, tmp))

    def check(self, what: str, model: nn.Module) -> list[str]:
        """All-gathers a digest of model and method state; raises when ranks differ."""
        digests = distributed.digest_check(what, [model.state_dict(), self._method_state()])
        self.checks += 1
        return digests


_CURRENT: Session | None = None


def current() -> Session | None:
    """The session `fit` reports to, if a run opened one."""
    return _CURRENT


@contextlib.contextmanager
def session(
    *,
    path: str | Path | None = None,
    resume: str | Path | None = None,
    fingerprint: dict | None = None,
    method=None,
    check_ranks: bool = False,
) -> Iterator[Session]:
    """Opens a run session for the `fit` calls inside (nested sessions are refused)."""
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("a compression run is already in progress in this process")
    fingerprint = fingerprint or {}
    state = load(resume, fingerprint) if resume is not None else None
    target = Path(path) if path is not None else (Path(resume) if resume is not None else None)
    _CURRENT = Session(
        path=target,
        fingerprint=fingerprint,
        method=method,
        check_ranks=check_ranks,
        resume=state,
    )
    try:
        yield _CURRENT
    finally:
        _CURRENT = None


def fingerprint(method: str, config: dict, budget, seed: int, model: nn.Module, data) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "method": method,
        "config": config,
        "budget": budget.to_dict(),
        "seed": seed,
        "model": model_digest(model),
        "data": data.fingerprint() if data is not None else None,
        "processes": distributed.world_size(),
    }


def load(path: str | Path, fingerprint: dict) -> dict:
    """Reads and validates a run checkpoint against this run's fingerprint.

    Raises:
        InputError: missing, damaged, not a run checkpoint, another version, or written by a
            different run (the differing fields are named).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {str(path)!r} does not exist")
    state = read(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(
            f"{str(path)!r} is not a compression-run checkpoint (write one with "
            "`compress prune ... --checkpoint PATH`)"
        )
    if state.get("version") != VERSION:
        raise InputError(
            f"checkpoint {str(path)!r} has version {state.get('version')}, this compressor "
            f"reads version {VERSION}"
        )
    theirs = state.get("fingerprint", {})
    differ = [
        key
        for key in sorted(set(theirs) | set(fingerprint))
        if theirs.get(key) != fingerprint.get(key)
    ]
    if differ:
        details = "; ".join(
            f"{key}: checkpoint {_short(theirs.get(key))}, this run {_short(fingerprint.get(key))}"
            for key in differ
        )
        raise InputError(
            f"checkpoint {str(path)!r} was written by a different run ({details}); "
            "resume with the same model, method, budget, options, data, seed and --nproc"
        )
    return state


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def model_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state (names, shapes and exact values)."""
    state = model.state_dict()
    return distributed.digest([*state.keys(), *state.values()])
