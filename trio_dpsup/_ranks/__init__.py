"""One rank's life: its task (rank.py) spawns the process after the clean-start checks,
probes it (prober.py over http_probe.py), watches its progress, captures evidence before a
kill, and restarts it under the restart policy; gpu_watch.py maps GPU readings, placement
and faults onto the ranks.

May import: `_state`, `_config`, `_output`, `_gpu`, `_proc`, `_errors`. Never the control
plane (`_plane`) nor the supervisor: what a rank shows the outside goes through the board.
"""
