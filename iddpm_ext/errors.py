"""Error types of iddpm_ext. Each is a built-in error type too, so code that catches
ValueError / ImportError / NotImplementedError keeps working."""


class ExtensionUnavailableError(ImportError):
    """The compiled extension iddpm_ext._C cannot be used (not built, built against another
    torch, or disabled): says why and the command that rebuilds it."""


class MissingDependencyError(ImportError):
    """An optional package that a requested feature needs is not installed: says which
    feature, which package and how to install it."""


class UnknownNameError(ValueError, NotImplementedError):
    """An unknown name was asked for (schedule, sampler, ...).

    A ValueError, and also a NotImplementedError so that code written against
    openai/improved-diffusion (which raises NotImplementedError) keeps working.
    """


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: says which file and why."""


class DataError(ValueError):
    """A data set that cannot be used: says which file or folder, and why."""
