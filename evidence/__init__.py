"""Attestation evidence shared by the sidecar and the broker: measurement event logs,
PCR computation and the binding of a quote to a nonce, an ephemeral key and a TLS certificate."""
