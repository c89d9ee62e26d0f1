"""The project's errors: each says what went wrong and what to do about it."""


class CAIError(RuntimeError):
    """Base class: `src/train.py` prints these as one clear message, without a traceback."""


class ConfigError(CAIError):
    """A config value or combination of values that cannot work."""


class ModelUnavailable(CAIError):
    """A model that cannot be loaded here (missing wheel, no network for a hub model, bad path)."""


class ArtifactError(CAIError):
    """An artifact that is missing, unfinished, or cannot be written."""


class EndpointError(CAIError):
    """A served labeller (an OpenAI-compatible HTTP endpoint) that cannot be used as configured."""
