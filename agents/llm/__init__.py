"""LLM calls as a stream: providers, registry, adapter, processor and the call_llm agent."""
