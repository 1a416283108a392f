"""The runner: the `autotp` command and distributed training of the rewritten graph.

One module per job: `cli` (the command), `launch` (`autotp train` before torchrun),
`config` (a run's options and the checks made before any process starts), `train` (one
rank's training loop), `rank_module` (a rank's module in either form, as
`autotp.parallelize` builds it), `objective` (causal or BERT's masked LM), `generate` (`autotp
generate`: sampling at any tp), `checkpoint` and `safe_dcp` (sharded checkpoints, read
without running code), `metrics` (metrics.jsonl and the progress output), `resolve` (from
a model name to the model, for every command), `drawn` (a model built from the seed, each
large tensor drawn when read), `data`, `evaluate` and `mesh`.

The library (`autotp.plan`, `parallelize`, `simulate`) never imports this package.

Takes a command line; gives a trained, evaluated or exported run through the public API.
"""
