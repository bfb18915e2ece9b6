"""Test support: a fake rank server with faults (``python -m trio_dpsup.testing.fake_rank``)."""
