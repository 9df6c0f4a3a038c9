"""Support code shared by the tests (launchers and builders); no tests live here."""
