"""Reading and writing: lazy safetensors reader, model-pool loading and checks, parameter keys, streaming of
fine-tuned models, path confinement, the atomic writer, output directories, the Hugging Face save and the
TSV-C compressed-checkpoint format. Nothing here knows an algorithm."""
