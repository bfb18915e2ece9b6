"""Process lifetime: spawning ranks, their trees and whose a process is (owners.py),
stopping them, the guardian.

May import: nothing of the package: it is the ground floor.

Standard library only where the guardian program imports it (cookie, membership, cgroup,
guardian_process).
"""
