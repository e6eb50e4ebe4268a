"""The `cnn-sparsegpt` commands over the library: the CLI (cli), one prune run with its files (pipeline, report,
options), benchmarks (bench), tables and plots (results, plot), training and fine-tuning (train, finetune) and
export (export)."""
