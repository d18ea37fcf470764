"""The one exception the data pipeline raises for bad input (a missing folder, a bad option value, an unknown
tokenizer). Scripts catch it, print its message and exit with code 2; it subclasses ValueError so library callers
can treat it as one."""


class DataError(ValueError):
    """Bad input to the data pipeline; the message says what was wrong and what is allowed."""
