"""ProbMask against GMP and FCPTS on Fashion-MNIST (issue 6), plus step time and memory.

For LeNet-5 and ResNet-20 at 90 / 95 / 98 % sparsity, from the same trained dense model:

* ProbMask (exact top-k mask, then fine-tuning with the mask fixed);
* GMP (Zhu & Gupta) with the same epochs, fine-tuning, weight optimiser and batch size;
* FCPTS applied to the dense model (post-training, its official defaults), when registered;
* global magnitude one-shot (no training) for reference.

Also the mask choices on the same trained scores (top-k / threshold / best-of-10, each
with BatchNorm re-estimated and no fine-tuning), the per-step time ratio ProbMask (K=1)
/ plain training (median of alternated steps), and the memory of a training step.

Run:  .venv/bin/python -m bench.probmask   (--quick: a smoke run that writes nothing)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

from bench.common import OUT, dense_baseline, machine, markdown_table, write_json, write_section
from compressor.budget import Budget
from compressor.data import load_data
from compressor.distill import train_loader
from compressor.methods import list_methods, prune
from compressor.methods.phases import train
from compressor.methods.probmask import ProbMask
from compressor.methods.targets import check_target
from compressor.train import evaluate, sgd

SPEC = "fashion-mnist"
# The dense baselines, shared with bench/fcpts.py through dense_baseline's cache.
DENSE = {
    "lenet5": {"epochs": 4, "limit": None},  # the full 54k training split
    "resnet20": {"epochs": 10, "limit": 20000},  # width 1, a 20k subset of the training split
}
# Pruning runs: ProbMask and GMP get the same data, epochs, batch (64) and weight SGD.
# ResNet-20 prunes on a 10k subset of its 20k: one ResNet-20 step costs ~0.4 s here.
TRAIN = {
    "lenet5": {"epochs": 2, "finetune_epochs": 1, "limit": None},
    "resnet20": {"epochs": 2, "finetune_epochs": 1, "limit": 10000},
}
# Weight lr 0.05 for both (the dense models' own peak lr) instead of the 0.01 default:
# in a single-run check at 98 % on LeNet-5 (3 + 1 epochs) it lifted GMP 89.4 -> 90.2 % and
# ProbMask 84.9 -> 87.3 %.
SHARED = {"lr": 0.05}
# ProbMask: K = 1 (the per-step goal is stated for K = 1; K = 2 doubles the cost for
# +0.4 points in the same check) and score lr 0.03: the official 6e-3 is tuned for ~60k
# steps, these runs have 1-3k (same check: 83.8 % at 6e-3, 84.9 % at 0.03).
PROBMASK = {"mask_samples": 1, "score_lr": 0.03}
# FCPTS post-training on 1024 unlabelled images: the official 1600 steps on LeNet-5; a
# eighth of them on ResNet-20, where 1600 steps alone took over 10 minutes per sparsity.
FCPTS = {"lenet5": {}, "resnet20": {"steps": 200}}
SPARSITIES = (0.9, 0.95, 0.98)
# One torch thread per process, tasks spread over three processes: the 2 cores are shared
# with other jobs, and under that contention two OpenMP threads in one process made small
# ops up to ~30x slower, which would distort every timing.
THREADS = 1
WORKERS = 3
TIMED_STEPS = 30
QUICK = {  # --quick: a smoke run of the script itself; tiny, writes no results
    "DENSE": {arch: {"epochs": 1, "limit": 2000} for arch in DENSE},
    "TRAIN": {arch: {"epochs": 1, "finetune_epochs": 1, "limit": 2000} for arch in DENSE},
    "FCPTS": {arch: {"steps": 20} for arch in DENSE},
    "SPARSITIES": (0.95,),
    "TIMED_STEPS": 5,
}


def main(quick: bool = False) -> None:
    """Runs every (model, sparsity) task in WORKERS processes; finished tasks are cached."""
    torch.set_num_threads(THREADS)
    if quick:
        globals().update(QUICK)
    tasks = [(arch, None) for arch in DENSE] + [(a, s) for a in DENSE for s in SPARSITIES]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(WORKERS, mp_context=context) as pool:
        done = dict(zip(tasks, pool.map(run_task, tasks, [quick] * len(tasks))))
    rows, choices, timing, memory = [], [], [], []
    for arch in DENSE:
        rows.append(done[arch, None]["dense"])
        timing.append(done[arch, None]["timing"])
        memory.append(done[arch, None]["memory"])
        for sparsity in SPARSITIES:
            rows += done[arch, sparsity]["rows"]
            choices.append(done[arch, sparsity]["choices"])
    report(rows, choices, timing, memory, quick)


def run_task(task: tuple[str, float | None], quick: bool) -> dict:
    """One model's step time and memory (sparsity None) or one sparsity's runs; cached.

    A finished task is kept in bench/out/probmask-runs/, so an interrupted benchmark
    resumes where it stopped; delete that folder to start afresh.
    """
    torch.set_num_threads(THREADS)
    if quick:
        globals().update(QUICK)
    arch, sparsity = task
    cache = OUT / "probmask-runs" / f"{arch}-{sparsity}.json"
    if cache.exists() and not quick:
        return json.loads(cache.read_text())
    model, data = dense_baseline(arch, SPEC, **DENSE[arch])
    dense_top1 = evaluate(model, data.test)  # the full 10k test set
    if sparsity is None:
        result = {
            "dense": _row(arch, 0.0, "dense", dense_top1, dense_top1, 0.0),
            "timing": step_times(arch, model, data),
            "memory": step_memory(arch, model, data),
        }
    else:
        train_data = load_data(SPEC, limit=TRAIN[arch]["limit"])
        rows, choices = run_sparsity(arch, model, train_data, sparsity, dense_top1)
        result = {"rows": rows, "choices": choices}
        print(markdown_table(rows, COLUMNS), flush=True)
    if not quick:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
    return result


def run_sparsity(arch, model, data, sparsity, dense_top1) -> tuple[list[dict], dict]:
    """Every method at one sparsity; returns the table rows and ProbMask's mask choices."""
    budget = Budget("weights", 1.0 - sparsity)
    epochs = {k: v for k, v in TRAIN[arch].items() if k != "limit"} | SHARED
    start = time.perf_counter()
    pruned, mask_row = probmask_with_choices(model, data, budget, **epochs, **PROBMASK)
    seconds = time.perf_counter() - start - mask_row.pop("choice seconds")
    top1 = evaluate(pruned, data.test)
    rows = [_row(arch, sparsity, "probmask", top1, dense_top1, seconds)]
    mask_row = {"model": arch, "sparsity": f"{sparsity:.0%}"} | mask_row
    methods = [("gmp", epochs), ("magnitude-global", {})]
    if "fcpts" in list_methods():
        methods.insert(1, ("fcpts", FCPTS[arch]))
    for name, config in methods:
        result = prune(model, name, budget, data, seed=0, **config)
        top1 = evaluate(result.model, data.test)
        rows.append(_row(arch, sparsity, name, top1, dense_top1, result.report["seconds"]))
    return rows, mask_row


def probmask_with_choices(model, data, budget: Budget, **config):
    """Trains ProbMask once; scores the three mask choices on copies, then finalizes top-k.

    Returns the final model and a table row; the row's "choice seconds" (the time spent on
    the alternatives) is subtracted from ProbMask's wall time by the caller.
    """
    torch.manual_seed(0)
    method = ProbMask(copy.deepcopy(model), budget, **config)
    loader = train_loader(data, method.config.batch_size)
    phases = method.phases(data)
    train(next(phases))  # weights and scores; the mask and fine-tuning follow below
    start, row = time.perf_counter(), {}
    for mask in ("topk", "threshold", "best-of-n"):
        config = dataclasses.replace(method.config, mask=mask, finetune_epochs=0)
        alternative = _trained_copy(method, model, config)
        alternative.fix_mask(loader)
        result = alternative.finalize()
        achieved = result.report["achieved"]["sparsity"]
        row[mask] = f"{evaluate(result.model, data.test):.2%} @ {achieved:.2%}"
    row["choice seconds"] = time.perf_counter() - start
    for phase in phases:  # the top-k mask, BatchNorm, fine-tuning
        train(phase)
    result = method.finalize()
    check_target(result.report, budget)
    row["undecided scores"] = f"{result.report['probmask']['undecided_fraction']:.1%}"
    return result.model, row


def _trained_copy(method: ProbMask, dense, config) -> ProbMask:
    """A ProbMask in `method`'s trained state, built afresh: deepcopy of a parametrized
    module shares its injected class, so removing one copy's parametrization breaks the other.
    """
    clone = ProbMask(copy.deepcopy(dense), method.budget, config)
    clone.prepare()
    clone.model.load_state_dict(method.model.state_dict())
    return clone


# --- per-step time -----------------------------------------------------------------------


def step_times(arch: str, model, data) -> dict:
    """Median time of a plain SGD step and a ProbMask step (K = 1 and 2), alternated."""
    batches = [b for _, b in zip(range(TIMED_STEPS + 3), data.train)]
    plain = copy.deepcopy(model).train()
    plain_opt = sgd(plain.parameters(), 0.01)
    methods = {k: _probmask_stepper(model, k) for k in (1, 2)}
    times = {"plain": [], 1: [], 2: []}
    for i, (x, y) in enumerate(batches):
        start = time.perf_counter()
        loss = F.cross_entropy(plain(x), y)
        loss.backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        _record(times["plain"], i, start)
        for k, (method, optimizer) in methods.items():
            start = time.perf_counter()
            _train_step(method, optimizer, x, y)
            method.step(0.7)  # after the ramp: the constraint binds, as in most steps
            _record(times[k], i, start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": arch,
        "plain ms": f"{1e3 * medians['plain']:.1f}",
        "ProbMask K=1 ms": f"{1e3 * medians[1]:.1f}",
        "ratio K=1": f"{medians[1] / medians['plain']:.2f}x",
        "ProbMask K=2 ms": f"{1e3 * medians[2]:.1f}",
        "ratio K=2": f"{medians[2] / medians['plain']:.2f}x",
    }


def _probmask_stepper(model, samples: int):
    method = ProbMask(copy.deepcopy(model), Budget("weights", 0.05), mask_samples=samples)
    method.prepare()
    method.model.train()
    return method, sgd(method.weight_parameters(), 0.01)


def _train_step(method: ProbMask, optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of ProbMask's training phase up to the method's own step: K samples, clip."""
    method.sampled_loss(method.model, (x, y)).backward()
    torch.nn.utils.clip_grad_norm_(method.model.parameters(), method.config.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _record(times: list[float], index: int, start: float) -> None:
    if index >= 3:  # the first steps allocate optimiser state
        times.append(time.perf_counter() - start)


# --- memory ------------------------------------------------------------------------------


def step_memory(arch: str, model, data) -> dict:
    """Persistent training state (counted) and the transient peak of one step (profiled)."""
    x, y = next(iter(data.train))
    plain = copy.deepcopy(model).train()
    plain_opt = sgd(plain.parameters(), 0.01)

    def plain_step():
        F.cross_entropy(plain(x), y).backward()
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    method, optimizer = _probmask_stepper(model, 1)

    def probmask_step():
        _train_step(method, optimizer, x, y)
        method.step(0.7)

    n = sum(p.numel() for p in method.score_parameters())
    plain_peak, pm_peak = _peak_bytes(plain_step), _peak_bytes(probmask_step)
    plain_state = _state_bytes(plain, plain_opt)  # after the steps: momentum exists
    pm_state = _state_bytes(method.model, optimizer, method.score_optimizer)
    mb = 1e-6
    return {
        "model": arch,
        "prunable weights n": f"{n:,}",
        "scores (n floats)": f"{4 * n * mb:.2f} MB",
        "plain state / step peak": f"{plain_state * mb:.2f} / {plain_peak * mb:.2f} MB",
        "ProbMask state / step peak": f"{pm_state * mb:.2f} / {pm_peak * mb:.2f} MB",
        "extra total per prunable weight": (
            f"{(pm_state + pm_peak - plain_state - plain_peak) / n:.1f} B"
        ),
    }


def _state_bytes(model, *optimizers) -> int:
    """Bytes of parameters and optimiser state (after a step has created that state)."""
    tensors = list(model.parameters())
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors += [t for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_bytes(step) -> int:
    """Peak of bytes allocated minus freed during one call of `step` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # warm-up: optimiser state exists before the profiled step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# --- report ------------------------------------------------------------------------------

COLUMNS = ["model", "sparsity", "method", "top-1", "vs dense", "wall s"]


def _row(arch, sparsity, method, top1, dense_top1, seconds) -> dict:
    return {
        "model": arch,
        "sparsity": f"{sparsity:.0%}",
        "method": method,
        "top-1": f"{top1:.2%}",
        "vs dense": f"{100 * (top1 - dense_top1):+.2f}",
        "wall s": f"{seconds:.0f}" if seconds else "",
    }


def _settings(arch: str) -> str:
    dense, train = DENSE[arch], TRAIN[arch]
    dense_split = "the full 54k split" if dense["limit"] is None else f"{dense['limit']:,} images"
    split = "the same split" if train["limit"] == dense["limit"] else f"{train['limit']:,} images"
    return (
        f"{arch}: dense {dense['epochs']} epochs on {dense_split}; ProbMask and GMP "
        f"{train['epochs']} + {train['finetune_epochs']} fine-tuning epochs on {split}"
    )


NOTES = (
    "Why ProbMask loses here (single-run checks outside this script, at 98 % on LeNet-5 "
    "with 3 + 1 epochs, back this reading): these runs are 0.5-3k steps from a trained "
    "model, while the official setting is ~60k steps (300 epochs) from scratch. The scores "
    "start at 1 and the projection lowers all of them by the same v while their gradients "
    "on a converged model are mostly noise, so through the ramp every weight is kept with "
    "about the same probability k: the network trains as a randomly thinned one and the "
    "final allocation is a noisy ranking (LeNet-5 at 98 %: ProbMask kept 24 % of conv1 and "
    "4.6 % of conv2, global magnitude 73 % and 16 %). GMP keeps the largest trained weights "
    "all along. Knobs tried: score lr 6e-3 -> 83.8 %, 0.03 -> 84.9 %; K = 2 -> 85.3 %; "
    "weight lr 0.05 -> 87.3 % (GMP 89.4 -> 90.2 % with the same change); a weight lr of "
    "3e-3 was worse. Run-to-run noise from the data order alone is about 0.5 points. "
    "Per-step time: the extra work is per weight (one random draw, the relaxation and its "
    "backward, Adam and the projection over n), so it weighs most on LeNet-5 (431k weights, "
    "little compute per weight): 1.27x a plain step in a quieter moment, 1.77x in this run, "
    "where three of our processes shared the 2 cores with other jobs."
)


def _goals(rows: list[dict], timing: list[dict]) -> str:
    """The issue's goals, checked against this run's numbers."""
    top1 = {(r["model"], r["sparsity"], r["method"]): float(r["top-1"][:-1]) for r in rows}
    lines = []
    for arch in DENSE:
        for sparsity in ("95%", "98%"):
            if (arch, sparsity, "gmp") not in top1:
                continue
            pm, gmp = top1[arch, sparsity, "probmask"], top1[arch, sparsity, "gmp"]
            verdict = "met" if pm > gmp else "missed"
            lines.append(f"{arch} {sparsity}: ProbMask {pm:.2f} % vs GMP {gmp:.2f} % ({verdict})")
    for row in timing:
        ratio = float(row["ratio K=1"][:-1])
        verdict = "met" if ratio <= 1.5 else "missed"
        lines.append(f"{row['model']} step time K=1: {ratio:.2f}x plain ({verdict})")
    return "Goals (ProbMask beats GMP at 95 % and 98 %; a K=1 step <= 1.5x plain): " + (
        "; ".join(lines) + "."
    )


def report(rows, choices, timing, memory, quick: bool) -> None:
    """Prints the tables and writes bench/RESULTS.md's probmask section and the JSON."""
    body = "\n\n".join(
        [
            "## ProbMask vs GMP vs FCPTS (issue 6)",
            "Command: `.venv/bin/python -m bench.probmask`. Fashion-MNIST, top-1 on the full "
            f"10k test set, one run (seed 0). {'; '.join(_settings(a) for a in DENSE)}. Both "
            f"training-time methods: batch 64, weight SGD {SHARED}, final mask exact (global "
            f"top-k), fine-tuning lr 1e-3 with the mask fixed; ProbMask {PROBMASK}; FCPTS "
            f"{FCPTS} (1024 unlabelled images). Machine: {machine()}; the 2 cores were shared "
            f"with other engineers' jobs, so tasks ran in {WORKERS} processes with one torch "
            "thread each; wall times compare within a model only.",
            markdown_table(rows, COLUMNS),
            _goals(rows, timing),
            NOTES,
            "ProbMask's mask choices on the same trained scores (BatchNorm re-estimated, no "
            "fine-tuning), as top-1 @ achieved sparsity; `undecided scores` = fraction of "
            "scores in (0.05, 0.95) at the end of training:",
            markdown_table(choices, list(choices[0])),
            f"Per-step time, median of {TIMED_STEPS} alternated steps (batch 64, one thread, "
            "the projection binding): a plain SGD step vs ProbMask's (K sampled masks, "
            "gradient clipping, weight SGD, score Adam, global projection):",
            markdown_table(timing, list(timing[0])),
            "Memory of a training step: state = parameters + optimiser state (counted after a "
            "step); step peak = bytes allocated and not yet freed during one step "
            "(torch.profiler, profile_memory), gradients included. The scores are one float "
            "per prunable weight; with their gradient and Adam's two moments the training "
            "state holds four floats per prunable weight.",
            markdown_table(memory, list(memory[0])),
        ]
    )
    print(body)
    if quick:
        return
    write_section("probmask", body)
    write_json("probmask", {"rows": rows, "choices": choices, "timing": timing, "memory": memory})


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
