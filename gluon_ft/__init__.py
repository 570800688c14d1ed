"""gluon-ft: fine-tuning (transfer learning) with Apache MXNet Gluon."""

from gluon_ft.isa import configure_amx
from gluon_ft.threads import configure_threads

# Must run before anything imports mxnet: it sizes its OpenMP pool once, at import.
THREAD_SETTINGS = configure_threads()
# Then, before MXNet's first kernel: oneDNN fixes its instruction set once, at that kernel.
ISA_SETTINGS = configure_amx()

__version__ = "0.1.0"
