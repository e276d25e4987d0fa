"""Host-side tools: deploy a build to a board over TVM RPC or SSH, benchmark and profile it."""
