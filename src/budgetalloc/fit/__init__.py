"""The fit: in memory (pipeline) and streamed from a file (fit_stream, trial_scan)."""
