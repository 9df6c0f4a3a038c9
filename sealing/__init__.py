"""Streaming AES-256-GCM envelope format with HPKE recipient key wrapping."""
