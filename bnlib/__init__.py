"""bnlib: the companion library of the batch-normalization book.

Modules (import the one you need; each is small and self-contained):

- :mod:`bnlib.numpy_bn`: the math in NumPy (forward, backward, inference, a layer).
- :mod:`bnlib.numpy_fast`: the same functions as fast, cache-blocked NumPy kernels.
- :mod:`bnlib.nn`: ``BatchNorm1d/2d/3d`` for PyTorch with a hand-written backward, and
  Batch Renorm, Ghost BN and ``SyncBatchNorm``.
- :mod:`bnlib.fold`: fold eval-mode batch norms into the layers before them.
- :mod:`bnlib.gradcheck`: numerical gradients by central differences.
- :mod:`bnlib.diagnose`: ``diagnose(model, x=None)`` finds the silent batch-norm bugs
  (a frozen BN that still updates, Keras' momentum, a bias or dropout before BN,
  untrained or stale running statistics, small batches).
- :mod:`bnlib.data`, :mod:`bnlib.models`, :mod:`bnlib.train`, :mod:`bnlib.plotting`,
  :mod:`bnlib.repro`: data, networks, a training loop, figures, and one arithmetic
  path and seeds for the book; :mod:`bnlib.spawn`: run a function in N processes of a
  ``torch.distributed`` group.
- ``python -m bnlib.bench``: the speed benchmark against torch's native kernels.
"""

# First, before NumPy or torch load: with BNLIB_ARITHMETIC=pinned (every chapter's
# first cell sets it), put them on the book's arithmetic path (see bnlib.repro).
# Without the variable, importing bnlib changes nothing.
from . import repro as _repro

if _repro.arithmetic_mode() == "pinned":
    _repro.pin_arithmetic()

from .diagnose import Finding, diagnose  # noqa: E402
from .numpy_bn import (  # noqa: E402
    BatchNorm,
    batchnorm_backward,
    batchnorm_backward_steps,
    batchnorm_forward,
    batchnorm_inference,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "Finding",
    "batchnorm_backward",
    "batchnorm_backward_steps",
    "batchnorm_forward",
    "batchnorm_inference",
    "diagnose",
    "__version__",
]
