"""Clusters: start ps-lite scheduler, server and worker processes, on one host or several."""
