"""MPI engine (placeholder until it lands; registers nothing)."""
