"""Clients for the multimodal Triton server (gRPC and HTTP)."""
