"""Certificate authority and SPIFFE identities for mTLS."""
