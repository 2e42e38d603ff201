"""Rollouts: generating responses on SGLang (or the embedded server) and bringing back
their logprobs and routed experts."""
