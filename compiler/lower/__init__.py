"""Lowering the reference model to TVM Relax: one static graph per scale (relax.frontend.nn)."""
