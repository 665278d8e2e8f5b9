"""Exception hierarchy. Every message names the problem *and* the fix, on one line."""


class RaydistillError(Exception):
    """Base class: the CLI turns these into a one-line message and exit code 2."""


class ConfigError(RaydistillError):
    """The pipeline config (YAML or a CLI override) is missing, malformed or invalid."""


class DataError(RaydistillError):
    """An input artifact (queries, samples) is missing, empty or has the wrong columns."""


class ModelError(RaydistillError):
    """A model name or path cannot be resolved to a loadable Hugging Face folder."""


class RunDirError(RaydistillError):
    """The output directory exists and neither resume nor overwrite was asked for."""
