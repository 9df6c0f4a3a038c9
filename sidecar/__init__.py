"""The sidecar in the confidential VM: TPM attester and workload runtime."""
