"""Quality harness and embedded model of thrift-vllm.

* ``data``: offline corpus (the Python standard library's source) and synthetic long-range tasks.
* ``model``: byte-level tokenizer files, the Llama config of the embedded model, ``export``.
* ``train``: ``python -m thrift_vllm.quality.train`` (resumable chunks).
* ``harness``: ``python -m thrift_vllm.quality`` (NLL/byte, retrieval, gap recovery, plot), with
  ``methods`` (configs), ``paged_eval`` (paged KV layouts, two steps), ``report`` (statistics).

Submodules import torch/transformers lazily; importing the package is cheap.
"""
