"""dni: Deep Noise Injection for recurrent networks under noisy analog computation.

Reference implementation of Qin & Vucinic, "Training Recurrent Neural Networks against
Noisy Computations during Inference" (2018).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dni")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
