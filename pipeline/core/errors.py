"""The one error type a user sees.

Every mistake a user can make (a missing file, a wrong tensor key, a tokenizer that does
not fit the model) is raised as :class:`DissectError` with a message that names the
problem and the fix. Stage entry points turn it into one line on stderr and exit status 2
(see :func:`pipeline.core.cli.run_stage`); anything else is a bug and keeps its traceback.
"""


class DissectError(Exception):
    """A problem with the user's input, described in one line that names the fix."""
