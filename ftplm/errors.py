"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit status 2; the Python API lets it propagate (it is a
ValueError, so callers that validate input the usual way catch it too).
"""


class FtplmError(ValueError):
    """Bad input: a missing file, an invalid config value, a corrupt checkpoint, ..."""
