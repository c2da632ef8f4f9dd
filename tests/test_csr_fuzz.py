"""The CSR reader under bench/fuzz_csr.py's mutations, 200 of them: only ValueError, small memory."""

from __future__ import annotations

from bench import fuzz_csr


def test_200_mutations_only_raise_value_error_in_bounded_memory():
    result = fuzz_csr.run(200, seed=1)
    table = result["table"]
    assert set(table) == {
        *fuzz_csr.RAW,
        *(f"{kind} (resealed)" for kind in fuzz_csr.JSON_EDITS),
        *(f"{kind} (crc kept)" for kind in fuzz_csr.JSON_EDITS),
    }
    totals = {o: sum(c.get(o, 0) for c in table.values()) for o in fuzz_csr.OUTCOMES}
    assert result["problems"] == []
    assert totals["other exception"] == 0 and totals["loaded, different"] == 0
    assert totals["ValueError"] + totals["loaded, equal"] == 200
    assert totals["loaded, equal"] == result["noops"] == 0  # every mutation changes a byte
    assert result["tracemalloc_peak_bytes"] < 32 * 2**20
    assert result["bomb"]["outcome"] == "ValueError" and result["bomb"]["peak"] < 2**20
    assert "max_elements=268435456" in result["bomb"]["message"]
