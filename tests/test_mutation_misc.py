"""Tests added by the mutation pass over fedsim/participation.py, fedsim/client_metrics.py and
fedsim/robust.py; each kills a named single-point mutant (table in
tests/test_mutation_strategies.py)."""

from __future__ import annotations

from fedsim.robust import krum, multi_krum


def test_krum_needs_2f_plus_3_participants():
    """Blanchard et al. 2017: Krum tolerates f Byzantine clients among n > 2f + 2, i.e. M >= 2f + 3
    (each row is scored over its M - f - 2 >= 1 nearest neighbours): f = 1 fits 5 participants,
    not 4. Kills `m < 2f + 3` -> `m < 2f + 2` (B06)."""
    assert krum(f=1).fits(5) is None
    bad = krum(f=1).fits(4)
    assert bad is not None and bad[0] == "f" and "2f + 3 = 5" in bad[1]
    # Multi-Krum averages at most M - f rows: select 6 of 7 with f = 2 is refused, of 8 fits
    assert multi_krum(f=2, select=6).fits(7)[0] == "select"  # type: ignore[index]
    assert multi_krum(f=2, select=6).fits(8) is None
