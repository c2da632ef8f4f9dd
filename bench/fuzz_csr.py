"""Fuzzing the CSR pack reader: seeded mutations of real packs, every outcome counted.

Four packs of a 90 %-sparse LeNet-5 (8x8 inputs, random weights: values do not matter)
are written with `export_csr` (fp32, fp16, int8 and fp32 in 1x4 blocks, every layer CSR,
a report in the metadata), and a fifth of a 2:4-masked one in the N:M layout (int8). Each mutation below is applied, the bytes are written to a
file and read with `exporters.csr.load`, and the outcome is one of

- ValueError: the reader refused the file (what it must do for a corrupt one);
- other exception: any other exception (a reader bug);
- loaded, equal: the same tensors as the original, bit for bit up to the sign of zero;
- loaded, different: the reader returned tensors the original does not hold (a bug).

Mutations: random byte flips anywhere; flips inside the header only; truncations; edits
of the 8-byte length field; JSON edits (duplicate keys, huge shapes, wrong dtypes,
negative numbers) and index overflows (column index past the view, row_ptr beyond its
blocks, an N:M group's offsets not increasing or a padding bit set), each half with the checksum recomputed as a writer would (so the structural
checks are what must catch it) and half without.

Run: .venv/bin/python -m bench.fuzz_csr [--mutations 1200] [--seed 0] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from bench.pattern_floor import build, mask_to_pattern_
from compressor import zoo
from compressor.methods import prune
from exporters import csr, csr_nm
from exporters import csr_format as fmt

COMMAND = ".venv/bin/python -m bench.fuzz_csr --mutations 1200 --seed 0"
PACKS = {"fp32": ("fp32", (1, 1)), "fp16": ("fp16", (1, 1)), "int8": ("int8", (1, 1))}
PACKS["fp32 1x4"] = ("fp32", (1, 4))
PACKS["int8 2:4"] = ("int8", None)  # the N:M layout: a 2:4-masked model, no block
OUTCOMES = ("ValueError", "other exception", "loaded, equal", "loaded, different")


def make_packs(folder: Path) -> dict[str, bytes]:
    """The five packs' bytes: four of one pruned LeNet-5, one of a 2:4-masked LeNet-5."""
    torch.manual_seed(0)
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    model = prune(model.eval(), "magnitude-global", 0.9).model
    nm_model = build("lenet5")
    nm_report = mask_to_pattern_(nm_model, "2:4", 0.5)
    out = {}
    for key, (values, block) in PACKS.items():
        path = folder / f"{key.replace(' ', '-')}.csr"
        report = {"method": "magnitude-global", "sparsity": 0.9, "values": values}
        packed, report = (model, report) if block else (nm_model, nm_report)
        csr.export_csr(packed, path, values=values, block=block, layers="all", report=report)
        out[key] = path.read_bytes()
    return out


# --- mutations: each takes (rng, data) and returns the mutated bytes -----------------------


def _split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _join(header: dict, body: bytes, seal: bool, raw: bytes | None = None) -> bytes:
    text = raw if raw is not None else json.dumps(header, separators=(",", ":")).encode()
    data = struct.pack("<Q", len(text)) + text + body
    if not seal:
        return data
    try:
        return fmt.seal(data)
    except ValueError:
        return data  # the edit removed the crc32 field: nothing to seal


def byte_flip(rng, data: bytes) -> bytes:
    position = int(rng.integers(len(data)))
    return _replace(data, position, int(rng.integers(1, 256)))


def header_flip(rng, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    return _replace(data, int(rng.integers(8 + length)), int(rng.integers(1, 256)))


def _replace(data: bytes, position: int, xor: int) -> bytes:
    return data[:position] + bytes([data[position] ^ xor]) + data[position + 1 :]


def truncation(rng, data: bytes) -> bytes:
    return data[: int(rng.integers(len(data)))]


def length_field(rng, data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    choices = [0, 1, length - 1, length + 1, length + 8, len(data), 2**63, 2**64 - 1]
    choices.append(int(rng.integers(2**40)))
    return struct.pack("<Q", choices[int(rng.integers(len(choices)))]) + data[8:]


def duplicate_key(rng, data: bytes, seal: bool) -> bytes:
    header, body = _split(data)
    name = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
    entry = json.dumps({name: header[name]}, separators=(",", ":"))[1:-1].encode()
    text = json.dumps(header, separators=(",", ":")).encode()
    if rng.random() < 0.5:  # a whole tensor entry twice, or one key of the tensors text twice
        text = text[:-1] + b"," + entry + b"}"
    else:
        text = text.replace(b'\\"encoding\\":', b'\\"view\\":[1,1],\\"encoding\\":', 1)
    return _join(header, body, seal, raw=text)


def huge_shape(rng, data: bytes, seal: bool) -> bytes:
    header, body = _split(data)
    entries = json.loads(header["__metadata__"]["tensors"])
    big = [int(rng.choice([16384, 2**20, 2**31, 2**40])), int(rng.choice([16384, 2**20]))]
    if rng.random() < 0.5:
        name = str(rng.choice(sorted(entries)))
        entries[name]["shape"], entries[name]["view"] = big, big
        header["__metadata__"]["tensors"] = json.dumps(entries)
    else:
        name = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
        header[name]["shape"] = big
    return _join(header, body, seal)


def wrong_dtype(rng, data: bytes, seal: bool) -> bytes:
    header, body = _split(data)
    entries = json.loads(header["__metadata__"]["tensors"])
    # F16/BF16/F32/F64 are valid rebuild dtypes: declaring one makes a valid, different pack
    bad = [None, 3, "F8", "f32", "", "I32", "U64", "BOOL"]
    value = bad[int(rng.integers(len(bad)))]
    if rng.random() < 0.5:
        name, field = str(rng.choice(sorted(entries))), str(rng.choice(["dtype", "values"]))
        entries[name][field] = value
        header["__metadata__"]["tensors"] = json.dumps(entries)
    else:
        parts = [
            (n, "indices" if e["encoding"] == "nm" else "col_indices") for n, e in entries.items()
        ]
        name = str(rng.choice([f"{n}.{p}" for n, index in parts for p in ("values", index)]))
        header[name]["dtype"] = [*bad, "F64"][int(rng.integers(len(bad) + 1))]
    return _join(header, body, seal)


def negative_number(rng, data: bytes, seal: bool) -> bytes:
    header, body = _split(data)
    entries = json.loads(header["__metadata__"]["tensors"])
    negative = -int(rng.integers(1, 2**31))
    if rng.random() < 0.5:
        name, field = str(rng.choice(sorted(entries))), str(rng.choice(["shape", "view", "block"]))
        entries[name][field][int(rng.integers(2))] = negative
        header["__metadata__"]["tensors"] = json.dumps(entries)
    else:
        name = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
        field = str(rng.choice(["shape", "data_offsets"]))
        if header[name][field]:
            header[name][field][int(rng.integers(len(header[name][field])))] = negative
    return _join(header, body, seal)


def index_overflow(rng, data: bytes, seal: bool) -> bytes:
    header, body = _split(data)
    entries = json.loads(header["__metadata__"]["tensors"])
    name = str(rng.choice(sorted(entries)))
    if entries[name]["encoding"] == "nm":
        return _nm_offsets(rng, header, body, name, entries[name], seal)
    part = f"{name}.{rng.choice(['col_indices', 'row_ptr'])}"
    begin, end = header[part]["data_offsets"]
    array = np.frombuffer(body[begin:end], fmt.DTYPES[header[part]["dtype"]]).copy()
    if len(array) == 0:
        return _join(header, body, seal)
    info = np.iinfo(array.dtype)
    at = int(rng.integers(len(array)))
    choices = [int(info.max), int(info.min), min(int(array.max()) + 1, int(info.max))]
    choices = [c for c in choices if c != int(array[at])]  # always a change
    array[at] = choices[int(rng.integers(len(choices)))]
    return _join(header, body[:begin] + array.tobytes() + body[end:], seal)


def _nm_offsets(rng, header, body: bytes, name: str, entry: dict, seal: bool) -> bytes:
    """An N:M weight's offsets made invalid: two equal in a group, or a set padding bit."""
    (rows, cols), (n, m) = entry["view"], entry["nm"]
    begin, end = header[f"{name}.indices"]["data_offsets"]
    count, bits = rows * cols // m * n, csr_nm.index_bits(m)
    offsets = csr_nm.unpack_bits(np.frombuffer(body[begin:end], np.uint8), count, bits)
    offsets = offsets.reshape(-1, n)
    if n > 1 and (count * bits % 8 == 0 or rng.integers(2)):
        group = int(rng.integers(len(offsets)))
        offsets[group, 1] = offsets[group, 0]  # they differed: offsets strictly increase
        packed = csr_nm.pack_bits(offsets, bits)
    else:
        packed = csr_nm.pack_bits(offsets, bits)
        packed[-1] |= 0x80  # past the last offset: count * bits is not a multiple of 8
    return _join(header, body[:begin] + packed.tobytes() + body[end:], seal)


RAW = {"byte flip": byte_flip, "header flip": header_flip, "truncation": truncation}
RAW["length field"] = length_field
JSON_EDITS = {
    "duplicate key": duplicate_key,
    "huge shape": huge_shape,
    "wrong dtype": wrong_dtype,
    "negative number": negative_number,
    "index overflow": index_overflow,
}


def mutations(packs: dict[str, bytes], count: int, seed: int):
    """`count` (pack key, mutation kind, mutated bytes), seeded, kinds in turn."""
    rng = np.random.default_rng(seed)
    kinds = [
        *RAW,
        *(f"{k} (resealed)" for k in JSON_EDITS),
        *(f"{k} (crc kept)" for k in JSON_EDITS),
    ]
    keys = sorted(packs)
    for i in range(count):
        key, kind = keys[i % len(keys)], kinds[i % len(kinds)]
        name, _, how = kind.partition(" (")
        data = packs[key]
        if name in RAW:
            mutated = RAW[name](rng, data)
        else:
            mutated = JSON_EDITS[name](rng, data, seal=how.startswith("resealed"))
        yield key, kind, mutated


# --- running -----------------------------------------------------------------------------


def outcome(path: Path, original: dict[str, torch.Tensor]) -> tuple[str, str]:
    """Loads `path`: (one of OUTCOMES, the error message or '')."""
    try:
        loaded = csr.load(path)
    except ValueError as exc:
        return "ValueError", str(exc)
    except Exception as exc:  # noqa: BLE001 (counting them is the point)
        return "other exception", f"{type(exc).__name__}: {exc}"
    same = set(loaded) == set(original) and all(
        csr.bit_equal(loaded[k], v) for k, v in original.items()
    )
    return ("loaded, equal" if same else "loaded, different"), ""


def bomb(folder: Path) -> dict:
    """The issue's case: a ~66 KB pack declaring a 16384x16384 weight with no non-zeros."""
    from safetensors.numpy import save

    rows = cols = 16384
    tensors = {
        "w.values": np.zeros(0, np.float32),
        "w.col_indices": np.zeros(0, np.uint16),
        "w.row_ptr": np.zeros(rows + 1, np.int32),
    }
    entry = {"encoding": "csr", "shape": [rows, cols], "view": [rows, cols], "block": [1, 1]}
    entry.update(values="F32", dtype="F32", scales=None)
    meta = {"format": fmt.FORMAT, "version": "2", "crc32": "00000000"}
    meta["tensors"] = json.dumps({"w": entry})
    path = folder / "bomb.csr"
    path.write_bytes(fmt.seal(save(tensors, metadata=meta)))
    tracemalloc.start()
    result, message = outcome(path, {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"bytes": path.stat().st_size, "outcome": result, "message": message, "peak": peak}


def run(count: int, seed: int) -> dict:
    """Makes the packs, applies `count` mutations, and returns the counts and peaks."""
    with tempfile.TemporaryDirectory() as folder:
        packs = make_packs(Path(folder))
        originals = {key: csr.load(Path(folder) / f"{key.replace(' ', '-')}.csr") for key in packs}
        target = Path(folder) / "mutated.csr"
        table: dict[str, Counter] = {}
        problems, noops = [], 0
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        tracemalloc.start()
        start = time.perf_counter()
        for key, kind, data in mutations(packs, count, seed):
            noops += data == packs[key]
            target.write_bytes(data)
            result, message = outcome(target, originals[key])
            table.setdefault(kind, Counter())[result] += 1
            if result in ("other exception", "loaded, different") and data != packs[key]:
                problems.append(f"{key} / {kind}: {result} {message[:120]}")
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        refused = bomb(Path(folder))
    return {
        "mutations": count,
        "seed": seed,
        "pack_bytes": {key: len(data) for key, data in packs.items()},
        "table": {kind: dict(counter) for kind, counter in table.items()},
        "noops": int(noops),
        "problems": problems,
        "seconds": round(seconds, 1),
        "bomb": refused,
        "tracemalloc_peak_bytes": peak,
        "max_rss_mib_before": round(rss_before / 1024, 1),
        "max_rss_mib_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def report(result: dict) -> str:
    """The markdown section: one row per mutation kind, one column per outcome."""
    from bench.common import markdown_table

    rows = []
    for kind, counts in result["table"].items():
        rows.append({"mutation": kind, **{o: counts.get(o, 0) for o in OUTCOMES}})
    totals = {o: sum(r[o] for r in rows) for o in OUTCOMES}
    rows.append({"mutation": "**total**", **totals})
    sizes = ", ".join(f"{k} {v} B" for k, v in result["pack_bytes"].items())
    return (
        "## CSR reader fuzzing (bench/fuzz_csr.py)\n\n"
        f"`{COMMAND}`: {result['mutations']} seeded mutations of five packs, four of a 90 "
        f"%-sparse LeNet-5 and one of a 2:4 LeNet-5 in the N:M layout ({sizes}), each read with `exporters.csr.load`, in {result['seconds']} s. "
        "*(resealed)*: the checksum recomputed after the edit, as a writer would, so the "
        "structural checks must catch it; *(crc kept)*: the original checksum left.\n\n"
        + markdown_table(rows, ["mutation", *OUTCOMES])
        + f"\n\nMutations that left the bytes unchanged: {result['noops']}. Peak traced "
        f"(tracemalloc) memory over all loads: {result['tracemalloc_peak_bytes'] / 2**20:.1f} "
        f"MiB; process max RSS {result['max_rss_mib_before']} MiB before the loads, "
        f"{result['max_rss_mib_after']} MiB after.\n\n"
        f"A {result['bomb']['bytes']}-byte pack declaring a 16384x16384 weight with no "
        f"non-zeros (2.4 GB peak before the reader bounded its rebuild): {result['bomb']['outcome']}, "
        f"tracemalloc peak {result['bomb']['peak'] / 2**20:.2f} MiB: "
        f"{result['bomb']['message'].split(': ', 1)[-1]}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only, no RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run(args.mutations, args.seed)
    text = report(result)
    print(text)
    for problem in result["problems"]:
        print("PROBLEM:", problem)
    if not args.no_write:
        from bench.common import write_json, write_section

        write_section("fuzz_csr", text)
        write_json("fuzz_csr", result)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
