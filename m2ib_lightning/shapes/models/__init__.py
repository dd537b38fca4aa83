"""Model builders and loaders."""
