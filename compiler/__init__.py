"""LiteVAR edge compiler: load VAR checkpoints, compress them, and lower them with TVM."""
