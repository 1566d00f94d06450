"""Measuring a compressed checkpoint (sttp-eval) and the compression report."""
