"""``gluon-ft bench``: the throughput of every path, and the recipes' accuracy side by side."""
