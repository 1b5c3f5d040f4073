"""One module per DVC stage, named after the stage: ``python -m stages.<name>``."""
