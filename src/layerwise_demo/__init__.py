"""The layerwise demo: the six techniques end to end on a Siamese LSTM over scikit-learn's digits.

A package of its own, outside the library's import path: ``import layerwise`` never imports
it. Run it with ``layerwise demo``, ``make demo`` or ``python -m layerwise_demo``; it needs
the ``demo`` extra (scikit-learn, matplotlib).
"""

from .data import SiameseLSTM, digit_pairs
from .run import run

__all__ = ["SiameseLSTM", "digit_pairs", "run"]
