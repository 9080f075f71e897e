"""Reports of a run: PNG plots and a self-contained HTML page, read from the run's archive only."""
