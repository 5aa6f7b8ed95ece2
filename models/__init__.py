"""One module per paper (installed as `mlrun.models`)."""
