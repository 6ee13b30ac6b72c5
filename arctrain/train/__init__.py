"""`arctrain train`: the loop and what it calls (optimizer, validation, metrics, start-up checks)."""
