"""The one error type a trainer's entry point turns into a one-line message and a non-zero exit (not a traceback)."""


class TrainingError(RuntimeError):
    """A problem the user must fix: bad input found once the run starts, a refused resume, non-finite weights."""
