"""GPU awareness: NVML, device names, the placement check, monitoring."""
