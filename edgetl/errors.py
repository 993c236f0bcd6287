"""The one exception type for user mistakes: the CLI prints it as one line and exits non-zero."""


class EdgetlError(Exception):
    """A problem with the user's recipe, data or files; the message names the key, file or fix."""


class GateFailed(EdgetlError):
    """A verify gate failed: the build measured everything (report.json is written) but publishes no bundle."""
