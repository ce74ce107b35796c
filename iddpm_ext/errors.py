"""Error types of iddpm_ext."""


class UnknownNameError(ValueError, NotImplementedError):
    """An unknown name was asked for (schedule, sampler, ...).

    A ValueError, and also a NotImplementedError so that code written against
    openai/improved-diffusion (which raises NotImplementedError) keeps working.
    """
