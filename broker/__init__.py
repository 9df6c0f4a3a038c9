"""The key broker: quote verification, enrollment, policy, key custody and release."""
