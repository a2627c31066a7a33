"""Project errors: each names what is wrong so a person can fix it without reading a traceback."""

from __future__ import annotations

from typing import Any


class FlywheelError(Exception):
    """Base class for every error Flywheel raises on purpose."""


class ConfigError(FlywheelError):
    """A configuration file, key or value is invalid. Names the file, the key and the reason."""

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems  # (source file or env var, dotted key, reason)
        lines = [f"{src}: {key or '<root>'}: {reason}" for src, key, reason in problems]
        super().__init__("invalid configuration:\n  " + "\n  ".join(lines))


class DataValidationError(FlywheelError):
    """A data batch failed its expectation suite; it has been quarantined."""

    def __init__(self, batch: str, failures: list[dict[str, Any]], quarantined_to: str | None) -> None:
        self.batch = batch
        self.failures = failures
        self.quarantined_to = quarantined_to
        names = ", ".join(f"{f['expectation']}({f.get('column') or ''})" for f in failures[:8])
        more = f" (+{len(failures) - 8} more)" if len(failures) > 8 else ""
        super().__init__(
            f"batch {batch} failed {len(failures)} expectation(s): {names}{more}; quarantined to {quarantined_to}"
        )


class FeatureJoinError(FlywheelError):
    """The point-in-time join lost more rows (or features) than the configured tolerance."""

    report: Any = None  # the JoinReport with the counts, set by flywheel.featurestore


class ModelIntegrityError(FlywheelError):
    """A model artifact does not match the digests recorded at registration, or holds untrusted types."""


class RegistryError(FlywheelError):
    """The model registry is missing something the caller needs (a version, an alias, lineage)."""


class SkewError(FlywheelError):
    """Online and offline feature vectors (or the model's predictions on them) disagree beyond tolerance."""

    def __init__(self, message: str, report: Any = None) -> None:
        self.report = report  # the SkewReport listing every mismatch (flywheel.scoring)
        super().__init__(message)


class StackError(FlywheelError):
    """The local stack (`flywheel up` / `down`) could not start, stop or read one of its processes."""
