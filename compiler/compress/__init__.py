"""LiteVAR compression: calibration, MDWA windows, ASC sharing, quantization and the plan file."""
