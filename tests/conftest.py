import os

import torch

# Without a GPU the Triton kernels run under the interpreter; it must be set before triton.jit
# decorates anything.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
