"""The paged KV cache's bookkeeping: a pool of fixed-size blocks, prefix-cache hashing, and the
per-request block tables. The tensors themselves live in the workers."""
