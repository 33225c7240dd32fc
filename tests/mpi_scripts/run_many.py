"""Run under mpiexec: `fedsim run SCENARIO --engine mpi --quiet --out OUT` for each scenario, in
one launch (saves the interpreter and torch start-up per scenario), then, with --loop-check, the
loop-level checks of loop_check.py. Exits with the first non-zero CLI exit code.

  mpiexec -n K python tests/mpi_scripts/run_many.py OUT [--loop-check] SCENARIO...
"""

import sys
import warnings

from fedsim.cli import main

if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="Sparse")
    out, rest = sys.argv[1], sys.argv[2:]
    loop_check = "--loop-check" in rest
    for path in (p for p in rest if p != "--loop-check"):
        code = main(["run", path, "--engine", "mpi", "--quiet", "--out", out])
        if code:
            sys.exit(code)
    if loop_check:
        from tests.mpi_scripts import loop_check as lc

        try:
            lc.main()
        except Exception as exc:  # noqa: BLE001 - any failure ends the job on every rank
            lc.fail(f"{type(exc).__name__}: {exc}")
