"""The KLIP model: SAR ViT, BERT-style multimodal mixture of encoder-decoder, heads."""
