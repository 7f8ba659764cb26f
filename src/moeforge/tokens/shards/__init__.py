"""Token shards in Megatron-LM's indexed-dataset layout (``MMIDIDX``, version 1), written and memory-mapped.

Megatron's layout is used unchanged so shards can be inspected or consumed by its tools. Files share a
prefix: ``PREFIX.bin`` holds every token array back to back; ``PREFIX.idx`` holds the header and three
arrays — the length (tokens) and byte offset of every *sequence*, and the *document index*, where document
``d`` owns sequences ``[doc[d], doc[d + 1])``. All little-endian.

Our mapping: a Megatron document is one training sample (a packed block of at most ``seq_len + 1``
tokens) and its sequences are the pieces of source documents packed into it, so segment boundaries are
exactly the places where attention may be cut. Padding is never stored; the loader adds it. Optional
sidecars with the same prefix: ``PREFIX.mask`` (uint8 per token, parallel to ``.bin``; 1 = the token is a
training target) and ``PREFIX.dom`` (uint16 per sample: the sample's domain id).

The writer streams tokens to disk under temporary names and publishes them with ``os.replace`` on close,
``.idx`` last: a present ``.idx`` means a complete shard. The reader validates every size against the
header before handing out views, so a corrupt or truncated file is a :class:`ShardError` naming the file,
never an ``IndexError`` deep in a training step.

The writer lives in :mod:`.writer`, the reader in :mod:`.reader`, the format constants and errors in
:mod:`.format`; import them from this package.
"""

from moeforge.tokens.shards.format import DTYPE_CODES, ShardError, token_dtype
from moeforge.tokens.shards.reader import IndexedShard
from moeforge.tokens.shards.writer import IndexedShardWriter, verify_files

__all__ = ["DTYPE_CODES", "IndexedShard", "IndexedShardWriter", "ShardError", "token_dtype", "verify_files"]
