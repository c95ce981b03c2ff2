"""Typed errors. Each carries the process exit status the CLI uses; the CLI renders them once, as one line."""


class MolmocapError(Exception):
    """Base of every error molmocap reports to a user."""

    exit_code = 1


class InputError(MolmocapError):
    """A bad argument or input file: a missing, unsupported, corrupt or truncated image, a prompt too long."""

    exit_code = 2


class ModelError(MolmocapError):
    """A model directory that is missing, incomplete or of another manifest format."""

    exit_code = 2


class ExportError(MolmocapError):
    """An export that cannot be done: an unreadable checkpoint, an unsupported configuration."""

    exit_code = 1


class CacheError(MolmocapError):
    """A result cache that `molmocap cache` cannot read or change (captioning only warns and goes on without it)."""

    exit_code = 1
