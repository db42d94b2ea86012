"""thrift-vllm: ThriftAttention (FP4 attention with a few FP16 blocks) for vLLM."""

from thrift_vllm.api import attention, select_blocks
from thrift_vllm.formats import QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"
__all__ = ["QuantizedTensor", "__version__", "attention", "dequantize", "quantize",
           "select_blocks"]
