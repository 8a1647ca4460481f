"""Exceptions of dni. Library code raises these; only the CLI turns them into exit codes."""


class DniError(Exception):
    """An error with a message meant for the user (no traceback needed)."""


class SpecError(DniError, ValueError):
    """An experiment specification or option value is invalid."""


class DataError(DniError):
    """A data file is missing, corrupted or cannot be downloaded."""


class StoreError(DniError):
    """The checkpoint store is unusable, or a stored file is missing or corrupted."""


class DivergenceError(DniError):
    """Training produced a non-finite loss or weights."""
