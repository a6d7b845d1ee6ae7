"""Inference: decode candidates on device, then invert, vote, score and write on the host.

    generate   jitted KV-cache decoding (greedy, sampling), per-task adapter stacks
    inference  val loss and candidates for every task's test inputs under augmented views
    evaluate   parse, invert, vote, metrics; results.json, predictions/, submission.json
"""
