"""The example clean-room workload: an advertiser and a publisher join their data inside the
clean room, train a conversion model, and get aggregate insights and a synthetic data set back.

- :mod:`workload.example.analysis`: the analytics, pure functions over in-memory tables.
- :mod:`workload.example.synthetic`: the Gaussian-copula synthetic data.
- :mod:`workload.example.app`: the entry point (``python -m workload.example``), which does
  all its I/O through the workload SDK.
- :mod:`workload.example.sampledata`: deterministic sample inputs for the demo.

See docs/example-workload.md.
"""
