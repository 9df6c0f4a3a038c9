"""The workload SDK (plaintext in and out through the sidecar) and the example workload."""
