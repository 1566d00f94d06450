"""Model-level compression: which layers, ranks for a ratio, conversion, calibration statistics, freezing for serving."""
