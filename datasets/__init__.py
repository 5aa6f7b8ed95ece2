"""Dataset families, one module each (installed as `mlrun.datasets`)."""
