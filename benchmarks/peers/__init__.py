"""`make bench-peers`: the project's checkpointing measured side by side with Hugging Face's Trainer,
Lightning, `torch.save` + fsync and `torch.distributed.checkpoint`, on the same Linear + AdamW state.

Needs the optional `peers` extra (lightning, transformers, accelerate). Every peer is called
through its own public (or, for HF, its own saving) entry point; what a peer does not do itself
(fsync) is added and reported apart, so "durable" means the same thing on every line.
"""
