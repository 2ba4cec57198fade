"""Storage tests against a real SeaweedFS server (see conftest.py)."""
