"""The LLM step: prompts and the prompt table, the engines behind the TensorRT-LLM contract, detokenization."""
