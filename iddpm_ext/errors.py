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


class ArgumentError(ValueError, AssertionError):
    """A bad argument where openai/improved-diffusion checks with ``assert`` (betas, tensor
    shapes, timesteps, model output channels, class labels, DDIM's reverse η).

    A ValueError, and also an AssertionError so that code and tests written against the
    reference (which raises AssertionError there) keep working.
    """


class TimestepRangeError(ArgumentError, IndexError):
    """A timestep outside [0, num_timesteps): an ArgumentError, and also an IndexError, which
    the reference raises there (its table lookup runs off the end)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: says which file and why."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint file that does not exist: a CheckpointError, and also the
    FileNotFoundError that torch.load (and so the reference) raises there."""


class DataError(ValueError):
    """A data set that cannot be used: says which file or folder, and why."""


class RunFolderLockedError(ValueError):
    """A run folder is in use: another training process holds its lock. Says which folder
    and the holder's pid."""


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after finishing its step and saving a checkpoint
    of it. A KeyboardInterrupt, so code that handles Ctrl-C handles this too.

    Attributes: ``signal`` (the signal number), ``step`` (the step saved), ``out_dir``,
    ``exit_code`` (128 + the signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, out_dir: str):
        import signal as _signal

        self.signal, self.step, self.out_dir = int(signum), int(step), out_dir
        self.exit_code = 128 + self.signal
        try:
            name = _signal.Signals(self.signal).name
        except ValueError:
            name = f"signal {self.signal}"
        super().__init__(
            f"stopped by {name} at step {self.step}; checkpoint saved in {out_dir} "
            f"(continue with --resume_checkpoint {out_dir})"
        )
