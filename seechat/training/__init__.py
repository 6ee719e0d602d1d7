"""seechat.training: the accelerate loop for every stage, in named steps.

    setup        accelerator, run directory, model, data loader (prepared)
    optim        parameter groups, AdamW, the warm-up + cosine schedule
    state        the run's position (step, epoch, batches, skipped) in and out of checkpoints
    checkpoint   atomic checkpoint directories and the `latest` pointer
    loop         `run`: one update with token-weighted accumulation, logging, saving, finishing
    metrics      metrics.jsonl, trackers, progress on a terminal or a log file
    validation   data.val scored during training (the scorer is passed in by the caller)
    guard        NaN/inf updates skipped and counted
    plots        loss / lr / validation curves as PNG
"""
