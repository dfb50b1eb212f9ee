"""The FusionBench algorithms (TSV-M, TSV-C, STI): option handling and orchestration over a shared base
(:mod:`.base`); routed evaluation of TSV-C and the STI report beside them."""
