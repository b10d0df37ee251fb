"""``blip2 demo``: the whole BLIP-2 pipeline on a synthetic world of coloured shapes, offline, on a CPU.

- ``world``: the synthetic image-text world (images, captions, VQA pairs, held-out split, eval formats).
- ``unimodal``: pre-trains the frozen parts on one modality each (ViT on images, LM and BERT on text).
- ``runner``: runs the real ``blip2`` commands in order and times them.
- ``report``: the result table, loss-curve plots and the gallery.
"""
