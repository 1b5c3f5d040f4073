"""Serving the export: the TF Serving stand-in (``tfserving``), the REST client (``predict``),
in-process folder inference (``batch``)."""
