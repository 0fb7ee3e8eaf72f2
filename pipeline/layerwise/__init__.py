"""Layer-by-layer work on checkpoints too large to hold: reading and writing sharded
safetensors (`checkpoints`, `shards`), the model family's module paths (`families`), running
decoder layers one at a time (`runner`), the sequential quantization engine (`engine`) and
AWQ's per-layer scale and clip search (`awq_search`)."""
