"""GPU awareness: NVML (nvml.py, and one run's session.py), the placement check
(placement.py), and who holds a device's memory (holders.py). The watch over the ranks'
devices while they run is `_ranks.gpu_watch`.

May import: `_proc` only (tree membership names a holder's owner).
"""
