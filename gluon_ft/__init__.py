"""gluon-ft: fine-tuning (transfer learning) with Apache MXNet Gluon."""

from gluon_ft.threads import configure_threads

# Must run before anything imports mxnet: it sizes its OpenMP pool once, at import.
THREAD_SETTINGS = configure_threads()

__version__ = "0.1.0"
