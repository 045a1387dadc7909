"""The engine: generation loop, Block Decoder stepping, sampling."""
