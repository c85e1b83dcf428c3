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

    def render(self, name=str) -> str:
        """The message with the options it names spelled by ``name`` (see :class:`OptionError`): here, as is."""
        return str(self)


def flag(name: str) -> str:
    """The command-line spelling of the option field ``name``: ``top_p`` -> ``--top-p``."""
    return "--" + name.replace("_", "-")


def named_options(template: str, values=()) -> list[str]:
    """The option fields ``template`` names, in order: its ``{key}`` placeholders not among ``values``."""
    return [key for _, key, _, _ in Formatter().parse(template) if key and key not in values]


def spell(template: str, values: dict, name=str) -> str:
    """``template`` with its ``{key}`` placeholders filled: from ``values``, else by ``name(key)``, the spelling
    of the option field ``key`` (``str``: the field's own name, :func:`flag`: the command line's)."""
    return template.format(**{key: name(key) for key in named_options(template, values)}, **values)


class OptionError(CharRNNError):
    """A bad value of the option field ``option``, or any error whose advice names options (then the first
    it names: ``start the run again with {force}``).

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
        return spell(self.template if lead in self.template else f"{lead} {self.template}", self.values, name)

    def __reduce__(self):  # picklable, although __init__ takes more than the message
        return _option_error, (self.option, self.template, self.values)


def _option_error(option: str, template: str, values: dict) -> OptionError:
    return OptionError(option, template, **values)


def options_error(template: str, **values) -> CharRNNError:
    """The error whose whole message is ``template`` (placeholders as in :class:`OptionError`): an
    :class:`OptionError` of the first option it names, so that each caller reads them in its own spelling,
    or a plain :class:`CharRNNError` where it names none."""
    options = named_options(template, values)
    return OptionError(options[0], template, **values) if options else CharRNNError(template.format(**values))
