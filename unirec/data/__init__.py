"""Offline data path: synthetic canvases, label preparation, features and the training loader."""
