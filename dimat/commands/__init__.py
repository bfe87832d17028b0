"""One module per ``dimat`` sub-command (see :mod:`dimat.cli`)."""
