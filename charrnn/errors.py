"""The user-facing exception types.

Anything a user can cause (a bad path, a bad option, an incompatible run
directory) raises :class:`CharRNNError` with a one-line message that names the
problem and the fix.  The command line prints it as ``error: <message>`` and
exits with status 2; internal bugs raise ordinary exceptions.

A bad option value raises :class:`OptionError`, which knows the option's field
name: the Python API and the server show it as ``top_p must be in (0, 1], got 2``,
the command line as ``--top-p must be in (0, 1], got 2``.
"""

from __future__ import annotations

from string import Formatter


class CharRNNError(Exception):
    """A problem with the user's input, with a message saying how to fix it."""


def flag(name: str) -> str:
    """The command-line spelling of the option field ``name``: ``top_p`` -> ``--top-p``."""
    return "--" + name.replace("_", "-")


class OptionError(CharRNNError):
    """A bad value of the option field ``option``.

    ``template`` is the rest of the sentence after the option's name; it names other options
    as ``{field_name}`` and values as ``{key}`` given in ``values``, e.g.
    ``OptionError("top_p", "must be in (0, 1], got {value}", value=2)`` (a template that names
    ``{top_p}`` itself is taken whole, for sentences that do not start with it).  ``str(error)`` names
    the options by their fields (``top_p``); :meth:`render` by any other spelling, such as
    :func:`flag` for the command line.
    """

    def __init__(self, option: str, template: str, **values):
        self.option, self.template, self.values = option, template, values
        super().__init__(self.render())

    def render(self, name=str) -> str:
        lead = "{" + self.option + "}"
        template = self.template if lead in self.template else f"{lead} {self.template}"
        names = {key: name(key) for _, key, _, _ in Formatter().parse(template)
                 if key is not None and key not in self.values}
        return template.format(**names, **self.values)

    def __reduce__(self):  # picklable, although __init__ takes more than the message
        return _option_error, (self.option, self.template, self.values)


def _option_error(option: str, template: str, values: dict) -> OptionError:
    return OptionError(option, template, **values)
