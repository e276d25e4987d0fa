"""Board descriptions (TVM targets, cross compilers, roofline figures), one file per board."""
