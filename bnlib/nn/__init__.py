"""Batch-norm modules for PyTorch with a hand-written backward: drop-in for
``torch.nn``'s, and the variants the book studies (Batch Renorm, Ghost BN,
SyncBatchNorm). Import every name from here: ``from bnlib.nn import BatchNorm2d``.

The package's files read bottom to top, each importing only those below it:
``_kernels`` (plain tensor math), ``_op`` (the operator and its autograd),
``functional`` (``batch_norm`` and its checks), ``batchnorm`` (the modules), then
``renorm``, ``ghost`` and ``sync`` beside each other. This file only re-exports.

``BatchNorm1d``, ``BatchNorm2d`` and ``BatchNorm3d`` subclass ``torch.nn``'s, so they
take the same constructor arguments, hold the same parameters and buffers (their
``state_dict`` loads into torch's and back), and pass ``isinstance`` checks. Only the
computation is replaced. The math is ours, in plain tensor operations, and the backward
pass is the closed form of the book's backward chapter:

    forward:   y  = gamma * (x - mu) * inv_std + beta,   inv_std = 1 / sqrt(var + eps)
    backward:  dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))
               dgamma = sum(dy * x_hat),   dbeta = sum(dy)

(in eval mode mu and var are the running statistics, constants, and
dx = gamma * inv_std * dy). Outputs, gradients and running statistics equal torch's.

How it plugs into PyTorch. The computation is a custom operator, ``bnlib::batch_norm``
(with ``bnlib::batch_norm_backward`` for its gradient), registered with
``torch.library`` the way PyTorch documents for operators that must work with its
tools: ``register_fake`` (shapes for ``torch.compile`` and ``torch.export``),
``register_autograd`` (the hand-written backward) and ``register_vmap`` (``torch.func``;
a vmapped batch norm is a batch norm over ``B * C`` channels). On top of it,
:class:`BatchNormFunction` adds forward-mode AD (``jvp``). So the modules work with:

- double backward (gradient penalties, MAML, Hessian-vector products): when
  ``create_graph=True`` the backward is computed from differentiable tensor operations
  that recompute ``mu`` and ``var`` from ``x``, so second-order gradients are exact;
- ``torch.func`` (``grad``, ``vmap``, ``jacrev``, ``jacfwd``, ``jvp``), forward-mode AD
  and ``gradcheck``'s batched-gradient check;
- ``torch.compile(fullgraph=True)``: Dynamo traces the same equations as tensor
  operations, which Inductor fuses (faster than torch's own kernel on CPU, see
  ``python -m bnlib.bench``);
- ``torch.export`` in training and eval mode: one ``bnlib.batch_norm`` node, and the
  exported program keeps the hand-written backward;
- ``torch.fx.symbolic_trace``: like torch's own batch norms, the modules are leaves
  (``call_module`` nodes), so FX passes see them as modules, and
  ``torch.ao.quantization.fuse_modules`` fuses Conv/Linear + BN (+ ReLU) with them.

TorchScript (``torch.jit.script``) is not supported: it is deprecated in PyTorch 2.13.

One deliberate difference from torch: a call that raises changes no state. torch bumps
``num_batches_tracked`` before it checks the batch size and the channel count; here
every check runs, in torch's order and with torch's exception types, before anything
is written.
"""

from ._op import BatchNormFunction
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .functional import batch_norm
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenormFunction
from .sync import SyncBatchNorm, SyncBatchNormFunction, revert_sync_batchnorm

__all__ = ["BatchNormFunction", "batch_norm",
           "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
           "BatchRenormFunction", "BatchRenorm1d", "BatchRenorm2d",
           "GhostBatchNorm1d", "GhostBatchNorm2d",
           "SyncBatchNorm", "SyncBatchNormFunction", "revert_sync_batchnorm"]
