"""User-facing errors: the CLI prints their message and exits with code 2, no traceback."""


class DistillkitError(Exception):
    """Base of every error that is the user's to fix (bad config, missing file, ...)."""


class ConfigError(DistillkitError):
    """The configuration or a file it names cannot be used as given."""


class ExportError(DistillkitError):
    """An export failed verification; the previous export (if any) is untouched."""


class WriteFailed(DistillkitError):
    """A checkpoint or export could not be written (a full disk, a quota): what was there
    before stands, the temporary files are gone."""


class PeerLost(DistillkitError):
    """A collective with the other processes of a multi-process run failed or timed out."""


class TrainingDiverged(DistillkitError):
    """Losses or gradients became NaN/Inf and the configured policy says stop."""


class Preempted(Exception):
    """A pre-emption signal stopped the run at a step boundary (not an error: requeue it)."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
