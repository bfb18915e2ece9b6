"""The supervisor's state: the typed snapshots the outside reads (status.py), the one
mutable `Board` they are taken from (board.py), with its view of the other members of a
group across nodes (group.py), and their JSON form, /status's document (document.py).

It stands below every family that reads or writes state (`_ranks`, `_plane`, the
supervisor, the harness).

May import: `_config`, `_gpu`, `_output`, `_errors`, `_proc` (whose a process is: the owners
that a rank's GPU placement and a port's holders name, which the document writes and reads).
"""
