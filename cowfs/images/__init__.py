"""Images and containers: the layer store, layer archives, import, commit and containers."""
