"""Rollout configuration: which servers, how to talk to them, how to sample."""

from __future__ import annotations

import os
import stat
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from megatron_rl.config.flags import ConfigError
from megatron_rl.config.run_view import RunView
from megatron_rl.rollout.protocol import SamplingParams

TIMEOUT_PER_TOKEN_S = 0.05
"""Least time budget per requested new token: 20 tokens/s, well under what one SGLang
request decodes even in a busy batch, so only a stuck request runs into the timeout."""
MAX_BACKOFF_S = 30.0
"""Cap of the doubling retry backoff."""
API_KEY_ENV = "MEGATRON_RL_ROLLOUT_API_KEY"
"""Environment variable with the servers' API key, read when neither --rl-rollout-api-key
nor --rl-rollout-api-key-file is given (a process's environment is readable by its user
alone; its command line, by every user of the node)."""


@dataclass(kw_only=True, frozen=True)
class RolloutConfig:
    """Rollout servers, the client's behaviour, sampling, and the embedded server."""

    urls: tuple[str, ...] = field(default=(), metadata={"flag": "--rl-rollout-url"})
    """Where /generate goes: SGLang server URLs (the client spreads requests over them) or
    one sglang-router URL, e.g. http://10.0.0.5:30000. Empty: start the embedded CPU
    server on this machine."""
    worker_urls: tuple[str, ...] = field(
        default=(), metadata={"flag": "--rl-rollout-worker-urls"}
    )
    """The SGLang servers that receive weight updates, cache flushes and health checks
    (sglang-router does not forward those calls). Default: the --rl-rollout-url servers.
    Required with a router URL (a router is recognised at start-up by its /workers
    listing, and the error names the workers it lists)."""
    api_key: str | None = field(default=None, metadata={"flag": "--rl-rollout-api-key"})
    """API key of the servers (sent as 'Authorization: Bearer <key>', as SGLang expects).
    Visible to every user of the node in the process list: prefer --rl-rollout-api-key-file
    or the environment variable MEGATRON_RL_ROLLOUT_API_KEY. Precedence: this flag, else
    the file, else the variable (the two flags together are refused)."""
    api_key_file: str | None = field(
        default=None, metadata={"flag": "--rl-rollout-api-key-file"}
    )
    """File holding the servers' API key (surrounding whitespace ignored). Refused if group
    or world may read it (chmod 600)."""
    concurrency: int = field(default=64, metadata={"flag": "--rl-rollout-concurrency"})
    """Most sequences in flight at once, over all servers (a grouped /generate counts as
    the samples it carries)."""
    group_requests: bool = field(default=True, metadata={"flag": "--rl-rollout-group-requests"})
    """Send the G samples of a prompt as one batched /generate (SGLang's list inputs, one
    rid and sampling seed per sample): one HTTP round trip per group, and the server gets
    the group at once, so it prefills the shared prompt once. Off: one request per sample
    (for a gateway that does not take batched requests)."""
    timeout_s: float = field(default=600.0, metadata={"flag": "--rl-rollout-timeout"})
    """Least seconds one /generate request may take before it counts as failed and is
    retried. The client waits max(this, TIMEOUT_PER_TOKEN_S (0.05 s) x
    --rl-max-new-tokens), so a long response (32k tokens: 1,638 s) is not cut off."""
    retries: int = field(default=5, metadata={"flag": "--rl-rollout-retries"})
    """Retries of a request after a connection error, timeout, 5xx or abort; also how many
    health probes (with exponential backoff) a server that stopped answering gets before it
    is declared down."""
    retry_backoff_s: float = field(default=1.0, metadata={"flag": "--rl-rollout-retry-backoff"})
    """First backoff in seconds; doubles with each retry (capped at 30 s)."""
    on_server_failure: Literal["continue", "fail"] = field(
        default="continue", metadata={"flag": "--rl-rollout-on-server-failure"}
    )
    """When a server stays down: 'continue' on the remaining servers (the batch fails only
    when none is left) or 'fail' the batch at once. Either way the server is named."""
    progress: bool = field(default=True, metadata={"flag": "--rl-rollout-progress"})
    """Show a progress bar while a rollout batch is generated."""

    temperature: float = field(default=1.0, metadata={"flag": "--rl-temperature"})
    """Sampling temperature (0 = greedy). SGLang reports mu_old as log softmax(logits /
    temperature), before top-k/top-p truncation: at any temperature other than 1 the trainer
    must score with logits / temperature too. At start-up a server that reports
    temperature-1 logprobs (return_original_logprob) is refused at such temperatures, and
    one that cannot say (SGLang: SGLANG_RETURN_ORIGINAL_LOGPROB is not in /server_info)
    gets a warning."""
    top_p: float = field(default=1.0, metadata={"flag": "--rl-top-p"})
    """Nucleus sampling mass (1 = off). Truncation is not reflected in mu_old."""
    top_k: int = field(default=-1, metadata={"flag": "--rl-top-k"})
    """Top-k sampling (-1 = off). Truncation is not reflected in mu_old."""
    max_new_tokens: int = field(default=256, metadata={"flag": "--rl-max-new-tokens"})
    """Most tokens generated per response."""
    stop_token_ids: tuple[int, ...] = field(default=(), metadata={"flag": "--rl-stop-token-ids"})
    """Token ids that end a response besides the model's end-of-sequence token."""
    seed: int = field(default=1234, metadata={"flag": "--rl-rollout-seed"})
    """Base seed: each sample's sampling_seed derives from it and the sample's position in
    the run (step, prompt, sample), and a retry keeps it. The embedded server always
    honours it (a retried or re-run request samples the same tokens); SGLang honours it
    only when started with --enable-deterministic-inference, and ignores it otherwise."""

    dtype: Literal["bf16", "fp32"] = field(default="bf16", metadata={"flag": "--rl-rollout-dtype"})
    """Embedded server: precision of the served model (bf16 disagrees a little with the fp32
    trainer, as SGLang does with Megatron)."""
    quantization: Literal["none", "fp8", "w8a8_fp8"] = field(
        default="none", metadata={"flag": "--rl-rollout-quantization"}
    )
    """Embedded server: SGLang's --quantization. fp8: linear and expert weights stored as
    FP8 e4m3 (per output channel, per expert), bf16 activations; w8a8_fp8: per-channel FP8
    weights and per-token FP8 activations. Router gates, embeddings, lm_head and norms stay
    bf16, as in SGLang and Qwen3's FP8 checkpoints. Needs --rl-rollout-dtype bf16."""
    host: str = field(default="127.0.0.1", metadata={"flag": "--rl-rollout-host"})
    """Embedded server: address to listen on."""
    port: int = field(default=0, metadata={"flag": "--rl-rollout-port"})
    """Embedded server: port (0 = pick a free one)."""
    num_servers: int = field(default=1, metadata={"flag": "--rl-rollout-num-servers"})
    """Embedded server: how many server processes to start (each loads the model)."""
    max_batch_size: int = field(default=32, metadata={"flag": "--rl-rollout-max-batch-size"})
    """Embedded server: most sequences generated together in one batch."""
    threads: int = field(default=1, metadata={"flag": "--rl-rollout-threads"})
    """Embedded server: torch CPU threads per server process (1 avoids fighting the trainer
    for the cores; raise it for larger models on many cores)."""
    colocate: bool = field(default=False, metadata={"flag": "--rl-rollout-colocate"})
    """Embedded server: serve it from a thread of trainer rank 0's process instead of a
    process of its own (``inference.colocated``), so torch and the libraries are in memory
    once, as a colocated SGLang engine shares the trainer's GPU (slime's --colocate, verl's
    hybrid engine). Same HTTP API, engine and numerics; it shares the trainer's torch
    threads and lives with the trainer (nothing to restart). One server; weights through
    the disk path."""
    startup_timeout_s: float = field(
        default=180.0, metadata={"flag": "--rl-rollout-startup-timeout"}
    )
    """Seconds to wait for every server (embedded or external, and the router) to answer
    /health at start-up; the error names each URL that never did."""

    def backoff_s(self, attempt: int) -> float:
        """Seconds to wait before retry or probe ``attempt`` (0-based): doubling, capped."""
        return min(self.retry_backoff_s * 2**attempt, MAX_BACKOFF_S)

    def resolved_api_key(self) -> str | None:
        """The servers' API key: --rl-rollout-api-key, else --rl-rollout-api-key-file (its
        contents stripped), else $MEGATRON_RL_ROLLOUT_API_KEY (empty = unset), else None.
        Raises ConfigError naming the unusable source; never the key itself."""
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("--rl-rollout-api-key and --rl-rollout-api-key-file both give the "
                              "servers' API key: give one")
        if self.api_key is not None:
            key, source = self.api_key, "--rl-rollout-api-key"
        elif self.api_key_file is not None:
            key = _read_key_file(self.api_key_file).strip()
            source = f"--rl-rollout-api-key-file {self.api_key_file}"
        else:
            key, source = os.environ.get(API_KEY_ENV) or None, f"${API_KEY_ENV}"
        if key is not None and not key.strip():
            raise ConfigError(f"{source} is empty")
        return key

    @property
    def generate_timeout_s(self) -> float:
        """Seconds the client waits for one /generate (see ``timeout_s``)."""
        return max(self.timeout_s, TIMEOUT_PER_TOKEN_S * self.max_new_tokens)

    @property
    def embedded(self) -> bool:
        """True when no URL is given and the embedded server must be started."""
        return not self.urls

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=tuple(self.stop_token_ids),
        )

    def validate(self, run: RunView) -> None:
        for flag, urls in (("--rl-rollout-url", self.urls),
                           ("--rl-rollout-worker-urls", self.worker_urls)):
            for url in urls:
                parsed = urllib.parse.urlparse(url)
                if parsed.scheme not in ("http", "https") or not parsed.netloc:
                    raise ConfigError(f"{flag} {url!r} is not an http(s)://host:port URL")
            if len(set(urls)) != len(urls):
                raise ConfigError(f"{flag} lists a server twice: {list(urls)}")
        if self.worker_urls and not self.urls:
            raise ConfigError(
                "--rl-rollout-worker-urls names external servers, but --rl-rollout-url is "
                "empty (the embedded server): give the router or servers with --rl-rollout-url"
            )
        self.resolved_api_key()
        checks = [
            (self.concurrency >= 1, f"--rl-rollout-concurrency must be >= 1, got {self.concurrency}"),
            (self.timeout_s > 0, f"--rl-rollout-timeout must be > 0 seconds, got {self.timeout_s}"),
            (self.retries >= 0, f"--rl-rollout-retries must be >= 0, got {self.retries}"),
            (self.retry_backoff_s >= 0, f"--rl-rollout-retry-backoff must be >= 0, got {self.retry_backoff_s}"),
            (self.temperature >= 0, f"--rl-temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"--rl-top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, f"--rl-top-k must be -1 (off) or >= 1, got {self.top_k}"),
            (self.max_new_tokens >= 1, f"--rl-max-new-tokens must be >= 1, got {self.max_new_tokens}"),
            (all(t >= 0 for t in self.stop_token_ids), f"--rl-stop-token-ids must be >= 0, got {list(self.stop_token_ids)}"),
            (0 <= self.port <= 65535, f"--rl-rollout-port must be in [0, 65535], got {self.port}"),
            (self.num_servers >= 1, f"--rl-rollout-num-servers must be >= 1, got {self.num_servers}"),
            (self.threads >= 1, f"--rl-rollout-threads must be >= 1, got {self.threads}"),
            (self.max_batch_size >= 1, f"--rl-rollout-max-batch-size must be >= 1, got {self.max_batch_size}"),
            (self.startup_timeout_s > 0, f"--rl-rollout-startup-timeout must be > 0, got {self.startup_timeout_s}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.quantization != "none":
            if self.urls:
                raise ConfigError(
                    f"--rl-rollout-quantization {self.quantization} configures the embedded "
                    "server, but --rl-rollout-url names external servers: start SGLang with "
                    f"--quantization {self.quantization} instead"
                )
            if self.dtype != "bf16":
                raise ConfigError(
                    f"--rl-rollout-quantization {self.quantization} computes in bf16: it needs "
                    f"--rl-rollout-dtype bf16, not {self.dtype}"
                )
        if self.colocate:
            refusal = (
                "names external servers (--rl-rollout-url)" if self.urls
                else f"asks for {self.num_servers} servers (one runs in the trainer's process)"
                if self.num_servers > 1
                else f"sets --rl-rollout-threads {self.threads}: a colocated server uses the "
                     "trainer's torch threads" if self.threads != 1
                else None)  # fmt: skip
            if refusal:
                raise ConfigError(f"--rl-rollout-colocate {refusal}")
        if self.port and self.num_servers > 1:
            raise ConfigError(
                f"--rl-rollout-port {self.port} fixes one port but --rl-rollout-num-servers is "
                f"{self.num_servers}: use port 0 (free ports)"
            )


def _read_key_file(path: str) -> str:
    """The contents of an API key file that only its owner may read."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"--rl-rollout-api-key-file {path} is not a regular file")
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            raise ConfigError(
                f"--rl-rollout-api-key-file {path} may be read by other users (mode "
                f"{stat.S_IMODE(mode):o}): chmod 600 {path}"
            )
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--rl-rollout-api-key-file {path} cannot be read: {exc}") from None
