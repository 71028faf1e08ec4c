"""The one base class of errors caused by what a user passed in (files, flags, configs, model refs).

The CLI turns these into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback."""


class InputError(ValueError):
    pass
