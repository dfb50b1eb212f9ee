"""How the work runs: worker threads with one BLAS thread each, the per-parameter TSV-M job and its loops,
the timing callback, and the split of parameters across the processes of a Fabric run."""
