"""The one base class of every refusal a user can act on.

Every exception the pipeline raises about what it was given (a setting, a record, an image, a
checkpoint, a freeze policy, a chat template) subclasses `UserError`, and its message names what is
wrong and the fix. `cli.run_main` prints such an error as one line and exits with status 2; any
other exception is a bug and keeps its traceback. Every package may import this module.
"""


class UserError(ValueError):
    """A refusal about the user's input. A ValueError, so `except ValueError` callers still hold."""


class ConfigError(UserError):
    """A setting, or a combination of settings, that cannot work. The message names the fix.
    Here, not in config.py: model/settings.py refuses model settings and may import only model/."""
