"""streamdet training: synthetic data, detectors and segmenters trained from scratch, export and evaluation."""
