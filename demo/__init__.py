"""The package's main job: build (or load) an implicit model, save it as a Hub repo, reload it as remote code and
generate text with it. Run `implicit-lm demo --help`."""
