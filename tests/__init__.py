"""The test suite. A regular package, so `tests.conftest` is this directory's even where an installed
distribution ships a top-level `tests` package into site-packages (torch-fidelity 0.4.0 does)."""
