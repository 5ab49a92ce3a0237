"""The audio-language model: frozen encoders' features -> trainable adapter/fusion -> frozen LLM."""
