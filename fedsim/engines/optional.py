"""Registration of engines whose heavy dependencies load only when they run."""
