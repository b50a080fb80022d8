"""emalab's model-facing library: embedded models, the model adapter, prompts, activations."""
