"""Data vectors: the :class:`~medvec.vectors.vector.DataVector` value object, its safetensors file format, the
validated lazy file the coordinator reads in place, compact encodings and Ed25519 signatures.  Used by both sides."""
