"""`compress prune`'s last check: a destroyed model is a failure, not an output file."""

from __future__ import annotations

import json

import click

from compressor.errors import InputError
from compressor.guard import AccuracyCollapseError, check_accuracy


def check_min_accuracy_usable(min_accuracy: float | None, data) -> None:
    """Refuses --min-accuracy up front when there are no labels to measure accuracy with."""
    if min_accuracy is not None and (data is None or not data.has_labels):
        raise InputError(
            "--min-accuracy needs labelled held-out data; pass --data with labels (y) "
            "or drop --min-accuracy"
        )


def check_pruned(report: dict, data, min_accuracy: float | None) -> None:
    """Raises AccuracyCollapseError (exit 1) when the pruned model's held-out accuracy is at
    chance or below `min_accuracy`; the full report goes to stderr first, since no file
    will hold it."""
    try:
        check_accuracy(
            report.get("top1"),
            report.get("dense_top1"),
            data.num_classes if data is not None else None,
            min_accuracy,
        )
    except AccuracyCollapseError:
        click.echo(json.dumps(report, indent=2, default=str), err=True)
        raise
