"""Test-only helpers (servers and builders) shared by the test suites."""
