"""The example clean-room workload: an advertiser and a publisher join their data inside the
clean room, train a conversion model, and get aggregate insights, a synthetic data set and an
HTML report back. Written on pandas, scikit-learn, SciPy and matplotlib (the optional
dependency group ``example``).

- :mod:`workload.example.analysis`: the analytics, pure functions over DataFrames.
- :mod:`workload.example.synthetic`: the Gaussian-copula synthetic data.
- :mod:`workload.example.report`: the self-contained HTML report.
- :mod:`workload.example.app`: the entry point (``python -m workload.example``), which does
  all its I/O through the workload SDK.
- :mod:`workload.example.sampledata`: deterministic sample inputs for the demo.

See docs/example-workload.md.
"""
