"""Federated digits CNN on Flower with LIPS."""
