"""The fast kernels' Python side: a CPU training path for ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` with a
batched weight gradient, the compiled dropout, and the pieces sampling and export share.

One file per kernel family, each fast function beside its plain reference::

    backend.py       Backend (which implementation runs) + use(...) / current()
    torch_compat.py  every private torch API, each behind a probe with a public fallback
    matmul.py        the per-step product (panels / oneDNN / addmm) and the batched weight gradients
    table.py         the input-table fold (embedding @ W_ih.T + b_ih) and its lookups
    dropout.py       the compiled hashed dropout beside F.dropout
    head.py          the output layer folded into the last GRU layer
    gru.py, lstm.py, elman.py   each layer's autograd Function: ATen loop and compiled path
    rnn.py           when the fast path applies, and rnn_forward()
"""
from . import backend, torch_compat
from .backend import Backend, use
from .dropout import Dropout, dropout
from .rnn import evaluation, head_usable, layer_forward, rnn_forward, supported, usable
from .table import embedded_projection, input_table

__all__ = ["Backend", "Dropout", "backend", "dropout", "embedded_projection", "evaluation", "head_usable",
           "input_table", "layer_forward", "rnn_forward", "supported", "torch_compat", "usable", "use"]
