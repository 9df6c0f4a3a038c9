"""Test harness: real services (swtpm, PostgreSQL) started on loopback for the tests."""
