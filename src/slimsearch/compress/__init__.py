"""Plan -> compressed nn.Module: the registered compression methods."""
