"""Run under mpiexec: `fedsim run SCENARIO --engine mpi --quiet --out OUT` for each scenario, in
one launch (saves the interpreter and torch start-up per scenario). Exits with the first
non-zero CLI exit code."""

import sys
import warnings

from fedsim.cli import main

if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="Sparse")
    out = sys.argv[1]
    for path in sys.argv[2:]:
        code = main(["run", path, "--engine", "mpi", "--quiet", "--out", out])
        if code:
            sys.exit(code)
