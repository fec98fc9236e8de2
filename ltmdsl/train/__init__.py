"""Training and scoring models built from specs on the eval tasks (`ltmdsl train`, `ltmdsl eval`).

One concept per module:

    groups      AdamW parameter groups: which parameters decay, decided by each parameter's role
    schedule    linear warmup then cosine decay of the learning rate
    loss        the answer-only cross-entropy, chunked so [B, T, V] is never materialised in fp32
    data        which samples a step trains on: a pure function of (seed, step), so a resume sees the same
    state       the run folder: atomic checkpoints (weights + spec, optimizer, schedule, RNG, data position)
    metrics     metrics.jsonl lines and the loss / accuracy plot
    loop        the training loop (`TrainConfig`, `train`)
    scoring     exact-match accuracy through the cache: prefill, then greedy decode of each answer
    heldout     a fast teacher-forced held-out exact match, the stopping rule of a run with a target

Imports torch (unlike `ltmdsl.evals`, which generates the tasks without it).
"""
