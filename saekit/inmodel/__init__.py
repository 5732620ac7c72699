"""In-model training: dictionaries trained with the model in the loop.  The stages never import this package.

- `finetune`: codebooks trained inside the model with it (Codebook Features), an objective of `saekit.engine`;
- `e2e`: dictionaries trained through the frozen model against KL(clean ‖ spliced), an objective of the engine;
- `report`: `splice-eval --finetuned`, the finetune folder judged by splice's own `evaluate`;
- `sites`: saekit hook names → Hugging Face modules, and the `Splicer` that replaces activations there;
- `codebooks`: straight-through maths, `InModelCodebook`, the --codebooks spec, `build_codebook`, `find_init`;
- `data`: training/held-out token sequences and the batch of any step;
- `model`: loading/saving the Hugging Face model, `lm_score`, `spliced_logits`, `sample_rows`.

Checkpoints, metrics and the identity hash come from `saekit.runs`, the loop from `saekit.engine`.
"""
