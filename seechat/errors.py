"""The error of the user's input: the base class of every error whose cause is something the user
gave seechat (a recipe, a data file, a model directory, an output path) rather than a bug.

The lowest room: it imports nothing from seechat, so every module can raise a subclass.
`seechat` (cli.main) ends such an error with its message on one line and exit status 2, without
a traceback; `seechat --debug VERB ...` shows the traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """An error in the user's input. The message names the input (the file, the key, the
    directory) and says what to do about it, because it is all the user sees."""


class RecipeError(UserError, ValueError):
    """A recipe (file, key or command-line override) that seechat cannot run."""
