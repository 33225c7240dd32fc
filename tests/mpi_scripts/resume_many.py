"""Run under mpiexec: `fedsim resume RUN --set rounds=R --engine mpi --quiet` for each run folder,
in one launch. Exits with the first non-zero CLI exit code.

  mpiexec -n K python tests/mpi_scripts/resume_many.py R RUN...
"""

import sys
import warnings

from fedsim.cli import main

if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="Sparse")
    rounds, runs = sys.argv[1], sys.argv[2:]
    for run in runs:
        code = main(["resume", run, "--set", f"rounds={rounds}", "--engine", "mpi", "--quiet"])
        if code:
            sys.exit(code)
