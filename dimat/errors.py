"""Errors that the command line reports as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user (config, file, flag): ``dimat`` prints ``dimat: error: <msg>`` and exits 2.

    The message should name the offending file and field, e.g.
    ``UserError("topo.json: field 'pi': row 2 sums to 0.8, expected 1")``.
    """
