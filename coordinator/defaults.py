"""Defaults of the coordinator's batch capacity, shared by the CLI (which must import nothing heavy), the
capacity rules and the scheduler."""

KV_MEMORY_FRACTION = 0.5  # of each device's free memory beside its weights, for the KV cache
MAX_SLOTS = 64  # bound on the sequence slots derived from memory
MAX_STEP_TOKENS = 256  # tokens per step: decode rows plus prompt chunks
MAX_QUEUE = 1024  # requests waiting for a slot before new ones are refused
MAX_STREAMS_PER_CLIENT = 256  # Generate streams one API key (or, without keys, one peer) may hold at once
MAX_PROMPT_CHARS = 1 << 20  # text prompts longer than this are refused before they are tokenized
# Failure detection: a node whose heartbeats stop for HEARTBEAT_TIMEOUT_MS is declared failed and its
# layers are re-placed. Sub-second values are allowed; too short a timeout on a loaded machine re-places
# healthy nodes (harmless to outputs, costly in time).
HEARTBEAT_INTERVAL_MS = 250
HEARTBEAT_TIMEOUT_MS = 1000
CAPACITY_WAIT_S = 60.0  # without a placement (too few nodes left), requests wait this long, then fail
# Compressed exchange between stages: messages of fewer tokens (decode steps) go uncompressed, since
# they are small and latency-bound; prefill messages are where bandwidth matters.
CODEC_MIN_TOKENS = 64
HTTP_PORT = 8000  # the OpenAI-compatible API, /metrics and /health (coordinator start --http-port)
# Decoding requests go this many steps ahead of their oldest step in flight (coordinator start --lookahead):
# stage 0 takes each row's input token from the step before it, so no step waits for a round trip through
# the coordinator. At most MAX_LOOKAHEAD.
LOOKAHEAD = 2
MAX_LOOKAHEAD = 4
# Tokens per sequence (prompt + generated) without --max-seq-len, fewer where the model has fewer positions.
MAX_SEQ_LEN = 2048
