"""The input pipeline (clip, resize, patchify, tokenize, pack); its sources are `vdit.datasets`.

`pipeline` turns the random-access sources of `vdit.datasets` into host-local packed batches:
per-example `transforms` (clip sampling, resizing to a token budget, `patchify`, captions to ids
by `tokenizer` or to embeddings from a `caption_table`), then `packing` into rows of L tokens
(DESIGN.md, "The packed batch"). `dense` gives the fixed-size batches of the models that need one
grid; `ink_crop` crops a `moving_digits` frame to its ink.
"""
