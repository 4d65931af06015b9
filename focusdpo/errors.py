"""The project's errors: one base class, so every command ends a user error with its message and exit status 2.

Each message names the field, file, line or pair at fault and the fix. The second base of each class keeps
``except ValueError`` / ``except OSError`` callers working.
"""


class FocusDPOError(Exception):
    """An input, setting or folder the user can fix; the message says how."""


class ConfigError(FocusDPOError, ValueError):
    """A configuration value is wrong; the message names the field and the fix."""


class PairDataError(FocusDPOError, ValueError):
    """The pair data is wrong; the message names the file, column, line or pair and the fix."""


class PromptSetError(FocusDPOError, ValueError):
    """The prompt file is wrong; the message names the file, the entry and the fix."""


class EvalInputError(FocusDPOError, ValueError):
    """The evaluation input is wrong (benchmark, images, LoRA); the message names it and the fix."""


class PairGenError(FocusDPOError, ValueError):
    """The pair-generation input is wrong; raised before any generation starts."""


class RunFolderError(FocusDPOError, RuntimeError):
    """The output folder or the checkpoint to resume cannot be used; the message names it and the fix."""


class OutputError(FocusDPOError, OSError):
    """An output folder cannot be written as asked; the message names the folder and the fix."""


class LoraFileError(FocusDPOError, ValueError):
    """A LoRA file does not fit what it is used for (another family, another model); the message says which."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step, the pairs and the last good state.

    Not a :class:`FocusDPOError`: it ends a run that started, with its traceback (see docs/stability.md)."""
