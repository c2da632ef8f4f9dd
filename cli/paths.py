"""The path checks every writing command runs first: before data, models or training.

Imports of the library stay inside the functions so that importing the CLI stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import click

force_option = click.option(
    "--force", is_flag=True, help="Overwrite output files that already exist."
)


def data_file(spec: str | None) -> str | None:
    """The file a `--data` spec reads, if it names one (PATH.npz / PATH.pt)."""
    if spec is not None and spec.lower().endswith((".npz", ".pt")):
        return spec
    return None


def check_paths(
    reads: Mapping[str, str | Path | None],
    writes: Mapping[str, str | Path | None],
    *,
    force: bool,
    may_exist: tuple[str, ...] = (),
    may_share: tuple[frozenset[str], ...] = (),
) -> None:
    """Refuses clashing, existing (without `force`) or unwritable outputs; exit 2 before work.

    Args:
        reads: option label -> path the command reads (MODEL, --data, --resume).
        writes: option label -> path the command writes.
        force: allow replacing existing outputs.
        may_exist: labels of outputs that may already exist (a checkpoint to resume).
        may_share: label pairs allowed to name one file (see `check_distinct`).

    Raises:
        InputError: the first problem found, naming the option(s) and the path.
    """
    from compressor.paths import check_distinct, check_new, check_writable

    check_distinct(reads, writes, may_share=may_share)
    for label, path in writes.items():
        if path is None:
            continue
        if label not in may_exist:
            check_new(label, path, force=force)
        check_writable(label, path)


def check_prune_paths(
    model: str,
    data: str | None,
    output: str,
    report: str | None,
    checkpoint: str | None,
    resume: str | None,
    *,
    force: bool,
) -> None:
    """`compress prune`'s files: a checkpoint may be rewritten only by resuming from it.

    `--resume R` alone also writes R (the default checkpoint path), so R is then an output
    that may exist; `--checkpoint C --resume R` reads R and writes C.
    """
    from compressor.errors import InputError
    from compressor.io import same_file

    reads = {"MODEL": model, "--data": data_file(data)}
    writes = {"-o/--output": output, "--report": report}
    if checkpoint is None and resume is not None:
        writes["--resume"] = resume
    else:
        reads["--resume"], writes["--checkpoint"] = resume, checkpoint
    check_paths(
        reads,
        writes,
        force=force,
        may_exist=("--resume", "--checkpoint"),
        may_share=(frozenset(("--checkpoint", "--resume")),),
    )
    if checkpoint is None or force or not Path(checkpoint).exists():
        return
    if resume is None or not same_file(checkpoint, resume):
        raise InputError(
            f"--checkpoint {checkpoint!r} exists; pass --resume {checkpoint} to continue "
            "that run, or --force to overwrite it"
        )


def check_train_paths(data: str, output: str, checkpoint: str | None, *, force: bool) -> None:
    """`compress train`'s files: an existing --checkpoint is resumed, so it may exist."""
    check_paths(
        {"--data": data_file(data)},
        {"-o/--output": output, "--checkpoint": checkpoint},
        force=force,
        may_exist=("--checkpoint",),
    )
