"""Training entry point: ``python -m ditmoe.train`` (see ``--help``)."""
