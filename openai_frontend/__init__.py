"""OpenAI-compatible front door for the chat ensembles.

A small FastAPI service that speaks the OpenAI chat completions API to users and
gRPC streaming to Triton: ``POST /v1/chat/completions`` (streamed as server-sent
events or whole), ``GET /v1/models``, ``GET /health`` (real inference) and
``GET /metrics`` (Prometheus). Image and audio content parts travel to the
``chat_*`` ensembles as the raw encoded bytes the client sent; the conversation
travels as the ensembles' ``messages`` input and the ``preprocessing`` model
applies the tokenizer's chat template to it once.

Start it with ``python -m openai_frontend --triton-url localhost:8001 --bundle
build/bundles/tiny-mm --port 9000`` (see ``docs/openai.md``).
"""
