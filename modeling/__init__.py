"""The model contract shared by training, evaluation and export: how token batches become embeddings
(`embedding`), packed attention (`packing`), length-grouped chunk plans (`chunking`), the process-group helpers
both sides use (`distributed`), profiler phases (`profiling`) and the export's file names (`export_format`).
Nothing here imports `trainer`, `evaluation` or `data_pipeline`."""
