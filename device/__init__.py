"""Board-side runtime: offline image generation with the TVM runtime, numpy and Pillow only."""
