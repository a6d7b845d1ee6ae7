"""Inference: decode candidates on device, then invert, vote, score and write on the host.

    generate   jitted KV-cache decoding (greedy, sampling), per-task adapter stacks
    dfs        jitted depth-first search: every completion above a probability threshold
    scoring    teacher-forced log-probabilities of candidates under augmented views (PoE)
    inference  val loss and candidates for every task's test inputs under augmented views
    evaluate   parse, invert, rank (vote, poe, count_logprob), metrics; results.json,
               predictions/, submission.json
"""
