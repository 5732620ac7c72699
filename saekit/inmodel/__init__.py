"""In-model training's building blocks, shared by `saekit.finetune` (joint codebooks) and `saekit.e2e`.

- `sites`: saekit hook names → Hugging Face modules, and the `Splicer` that replaces activations there;
- `codebooks`: straight-through maths, `InModelCodebook`, the --codebooks spec, `build_codebook`, `find_init`;
- `data`: training/held-out token sequences and the batch of any step;
- `model`: loading/saving the Hugging Face model, `lm_score`, `sample_rows`;
- `checkpoint`: resumable checkpoints as safetensors + JSON.
"""
