"""Stage 1: audio, the A-VB corpus reader, the wav2vec2 backbone, fine-tuning and the per-layer dump."""
