"""Where output goes: the ranks' lines through the log pump (pump.py) to our stdout and to
per-rank files (log_files.py), the supervisor's own records (log_format.py), and the
redaction of secrets from whatever is shown or written (redact.py).

May import: `_errors` only. It stands below the configuration, which redacts the command
lines it shows.
"""
