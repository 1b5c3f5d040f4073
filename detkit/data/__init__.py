"""Datasets: download and safe extraction (``archive``), the label map, TF OD API TFRecords
(``records``), tf.data input pipelines (``pipeline``)."""
