"""The command line: the typer app (app), its extra commands, Rich progress."""


def main() -> None:
    """The ``budgetalloc`` console script: runs :func:`budgetalloc.cli.app.main`."""
    from budgetalloc.cli.app import main as run

    run()
