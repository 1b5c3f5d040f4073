"""The embedded sample dataset: its generator (``make_sample.py``) and the archives it writes."""
