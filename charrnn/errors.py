"""The one user-facing exception type.

Anything a user can cause (a bad path, a bad option, an incompatible run
directory) raises :class:`CharRNNError` with a one-line message that names the
problem and the fix.  The command line prints it as ``error: <message>`` and
exits with status 2; internal bugs raise ordinary exceptions.
"""


class CharRNNError(Exception):
    """A problem with the user's input, with a message saying how to fix it."""
