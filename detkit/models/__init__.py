"""Detector families behind one interface (``family``); one module per family (``retinanet``)."""
