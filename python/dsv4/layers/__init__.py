"""nn.Modules of the V4 model: attention (SWA/CSA/HCA), compressor, indexer, MoE, mHC, RoPE, norms."""
