"""Errors raised at the edges, for input a user can fix. The CLI prints them without a traceback."""


class DataError(ValueError):
    """Bad input data: the message names the file, the field and what was expected."""


class StoreError(ValueError):
    """A feature store that is missing, corrupt, incomplete or does not match what was asked for."""
