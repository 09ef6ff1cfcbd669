"""The `cowfs` command line: `main` dispatches, `images` holds the image commands, `report` ends one on an error."""
