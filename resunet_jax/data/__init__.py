"""Datasets: the kaggle_3m LGG layout (real or synthetic) and its TFDS preparation."""
