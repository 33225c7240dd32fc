"""Tests added by the mutation pass over fedsim/participation.py, fedsim/client_metrics.py and
fedsim/robust.py; each kills a named single-point mutant (table in
tests/README.md)."""

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


def test_uniform_participation_rounds_the_fraction():
    """`uniform` with a fraction takes k = max(1, round(fraction N)) clients every round:
    fraction 0.37 of 10 clients is 4 (not floor(3.7) = 3). Kills `round` -> `int` (P04)."""
    from fedsim.participation import build_participation

    part = build_participation("uniform", {"fraction": 0.37}, num_clients=10, seed=0, label_dist=None)
    assert [int(part.mask(t).sum()) for t in range(5)] == [4] * 5
    assert part.probabilities.tolist() == [0.4] * 10
