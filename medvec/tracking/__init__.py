"""Versioning and tracking (the only part of ``medvec`` that imports MLflow or drives DVC): hospital and merge
runs, the registered model and its champion gate, lineage, the git+DVC registry, and the one way a merge is
finished."""
