"""``thrift-vllm serve``: vLLM's OpenAI-compatible server with the ThriftAttention backend always
selected, per-request FP16 budgets (``X-FP16-Budget`` header or ``fp16_budget`` in the body),
per-budget prefix-cache salts, budget metrics and ``GET /v1/thrift/config``.

Installed as ``thrift_vllm.server`` (source folder ``server/``). Modules:

- ``budget``: parsing and resolving budgets (no vLLM, no web framework) — pure functions;
- ``middleware``: the ASGI middleware (auth, config route, budget -> ``vllm_xargs``/``cache_salt``);
- ``metrics``: the project's Prometheus series (added to vLLM's ``/metrics``);
- ``models``: the default model (trained if shipped, else the untrained placeholder);
- ``cli``: ``thrift-vllm`` (``serve``, ``--version``).
"""
