"""Data: radiograph/CT I/O, datasets, DRR rendering, nodule insertion, the embedded default dataset."""
