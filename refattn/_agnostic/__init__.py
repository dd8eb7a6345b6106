"""Pure array-API implementations (no library-specific calls anywhere below here)."""
