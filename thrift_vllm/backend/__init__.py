"""ThriftAttention as a vLLM attention backend.

``plugin.register`` (the ``vllm.general_plugins`` entry point) registers it as
``AttentionBackendEnum.CUSTOM``; select it with ``--attention-backend CUSTOM`` or
``LLM(..., attention_backend="CUSTOM")``. Settings: ``config.ThriftBackendConfig``. Every vLLM
import goes through ``compat`` (version check). Importing this package does not import vLLM.
"""
