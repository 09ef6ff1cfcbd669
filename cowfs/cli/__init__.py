"""The `cowfs` command line: `main` dispatches, `images` holds the image commands."""
