"""Deployment: inference forms, predict, report, export and serve.

They use a finished run (its ``model.params``, ``classes.json`` and ``config.json``) and never
import the training code.
"""
