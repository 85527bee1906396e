"""Triton kernels, installed as `cocord_fast.kernels`; this package imports only torch and triton.

Each op module holds its pure-torch reference (the semantics), the Triton kernels (defined on
first use, so `import cocord_fast.kernels` needs no triton), and the public function, whose
`impl="auto"|"triton"|"torch"` picks the implementation (auto: Triton on CUDA tensors).
"""
from ._dispatch import implementations_used, triton_unavailable
from .bank_scores import bank_scores, bank_scores_ref
from .momentum_update import momentum_update_, momentum_update_ref
from .queue_infonce import queue_infonce, queue_infonce_ref

__all__ = ["bank_scores", "bank_scores_ref", "implementations_used", "momentum_update_",
           "momentum_update_ref", "queue_infonce", "queue_infonce_ref", "triton_unavailable"]
