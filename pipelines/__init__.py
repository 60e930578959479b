"""DVC stage entry points: one module per dvc.yaml stage, a pure core call and a thin main()."""
