"""Process lifetime: spawning ranks, their trees, stopping them, the guardian.

Standard library only where the guardian program imports it (cookie, membership, cgroup,
guardian_process).
"""
