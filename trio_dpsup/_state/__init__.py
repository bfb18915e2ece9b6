"""The supervisor's state: the typed snapshots the outside reads (status.py), the one
mutable `Board` they are taken from (board.py), and their JSON form, /status's document
(document.py).

It stands below every family that reads or writes state (`_ranks`, `_plane`, the
supervisor, the harness) and imports only the floors under it: `_config`, `_gpu`, `_output`,
`_errors`.
"""
