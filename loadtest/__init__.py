"""Load tests against a running rec server (127.0.0.1 only)."""
