"""Data: decoding, image folders, splits, the book's transforms, loaders, packs and downloads.

Below the model and training code; imports only the base modules (errors, paths).
"""
