"""The command line: the typer app (main), its extra commands, Rich progress."""
