"""One module per DVC stage. Each reads its section of params.yaml and writes its declared outputs only."""
